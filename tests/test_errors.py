"""Bad input gets a clear exception naming the argument and the fix."""
import pytest
import torch

import flowsolve as fs

VP = fs.paths.VP()


def eps_model(path=VP, fn=None):
    return fs.Model(fn or (lambda x, t: 0.5 * x), path, predicts="eps")


def test_not_callable():
    with pytest.raises(TypeError, match="fn must be callable"):
        fs.Model(42, VP)


def test_model_must_be_wrapped():
    with pytest.raises(TypeError, match="wrap your callable"):
        fs.sample(lambda x, t: x, (2, 2))


def test_output_shape_differs_from_input():
    m = fs.Model(lambda x, t: x[:, :1], VP, predicts="eps")
    with pytest.raises(ValueError, match=r"output has shape \(4, 1\) but its input x has shape \(4, 3\)"):
        fs.sample(m, (4, 3), steps=2)


def test_output_not_a_tensor():
    with pytest.raises(TypeError, match="must return a tensor"):
        fs.sample(fs.Model(lambda x, t: 1.0, VP), (4, 3), steps=2)


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_not_positive(steps):
    with pytest.raises(ValueError, match=f"steps={steps} must be >= 1"):
        fs.sample(eps_model(), (2, 2), steps=steps)


def test_steps_not_int():
    with pytest.raises(TypeError, match="steps must be a positive int"):
        fs.sample(eps_model(), (2, 2), steps=2.5)


def test_grid_not_monotone():
    with pytest.raises(ValueError, match="strictly decreasing"):
        fs.sample(eps_model(), (2, 2), grid=[1.0, 0.5, 0.7, 0.1])


def test_grid_increasing_says_reverse_it():
    with pytest.raises(ValueError, match=r"increasing.*flip"):
        fs.sample(eps_model(), (2, 2), grid=[0.1, 0.5, 1.0])


def test_grid_outside_path_range():
    with pytest.raises(ValueError, match=r"defined on \[0.0, 1.0\]"):
        fs.sample(eps_model(), (2, 2), grid=[1.5, 0.5, 0.1])


def test_t_range_outside_path():
    with pytest.raises(ValueError, match="t_min < t_max"):
        fs.sample(eps_model(), (2, 2), steps=3, t_min=-0.1)
    with pytest.raises(ValueError, match="t_min < t_max"):
        fs.sample(eps_model(), (2, 2), steps=3, t_min=0.5, t_max=0.4)


def test_grid_with_nan():
    with pytest.raises(ValueError, match="NaN or inf"):
        fs.sample(eps_model(), (2, 2), grid=[1.0, float("nan"), 0.1])


def test_unknown_grid_name_suggests_closest():
    with pytest.raises(ValueError, match="Did you mean 'logsnr'"):
        fs.sample(eps_model(), (2, 2), grid="logsrn")


def test_unknown_solver_lists_names_and_suggests():
    with pytest.raises(ValueError, match=r"registered solvers: .*heun.*Did you mean 'heun'"):
        fs.sample(eps_model(), (2, 2), solver="huen")


def test_unknown_predicts_suggests():
    with pytest.raises(ValueError, match="Did you mean 'velocity'"):
        fs.Model(lambda x, t: x, VP, predicts="velocty")


def test_unknown_time_convention():
    with pytest.raises(ValueError, match="time_convention"):
        fs.Model(lambda x, t: x, VP, time_convention="reverse")


def test_integer_dtype_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        fs.sample(eps_model(), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        fs.sample(eps_model(), (2, 2), dtype=torch.int32)


def test_eps_model_at_alpha_zero_is_a_singularity():
    """An eps model cannot give x0 / velocity where alpha = 0 (rectified flow at t = 1)."""
    rf = fs.paths.RectifiedFlow()
    m = fs.Model(lambda x, t: x, rf, predicts="eps")
    for solver in ("ddim", "euler", "heun"):
        with pytest.raises(ValueError, match=r"evaluate this eps-model at t=1 .*t_max < 1"):
            fs.sample(m, (2, 2), solver=solver, steps=4)
    fs.sample(m, (2, 2), solver="ddim", steps=4, t_max=0.99)  # inside the range: fine


def test_eps_model_at_sigma_zero_is_a_singularity():
    """No solver here evaluates at the last grid point except Heun's corrector, which skips it at
    sigma = 0; asking the model itself for a conversion there names the problem."""
    with pytest.raises(ValueError, match=r"eps-model at t=0 .*t_min > 0"):
        eps_model().conversion("velocity", [0.5, 0.0])


def test_x0_model_at_alpha_zero_is_a_singularity():
    rf = fs.paths.RectifiedFlow()
    m = fs.Model(lambda x, t: x, rf, predicts="x0")
    with pytest.raises(ValueError, match=r"x0-model at t=1 "):
        fs.sample(m, (2, 2), solver="euler", steps=4)


def test_final_step_to_sigma_zero_is_allowed():
    x = fs.sample(eps_model(), (3, 2), solver="heun", steps=3, grid="edm", t_min=0.0)
    assert bool(torch.isfinite(x).all())


def test_sde_singular_coefficients():
    rf = fs.paths.RectifiedFlow()
    m = fs.Model(lambda x, t: -x, rf, predicts="velocity")
    with pytest.raises(ValueError, match=r"not finite .*t_max < 1 for an SDE on rectified flow"):
        fs.sample(m, (2, 2), solver="euler_maruyama", steps=4)


def test_logsnr_grid_needs_finite_ends():
    rf = fs.paths.RectifiedFlow()
    m = fs.Model(lambda x, t: -x, rf, predicts="velocity")
    with pytest.raises(ValueError, match="finite log-SNR"):
        fs.sample(m, (2, 2), grid="logsnr", steps=4)


def test_nan_from_model_names_step_and_t():
    calls = {"n": 0}

    def bad(x, t):
        calls["n"] += 1
        return x * float("nan") if calls["n"] == 3 else 0.5 * x

    with pytest.raises(FloatingPointError, match=r"NaN/inf at step 2 \(t=0\.\d+"):
        fs.sample(fs.Model(bad, VP), (2, 2), solver="euler", steps=5, check_finite=True)


def test_bad_noise_or_shape():
    with pytest.raises(TypeError, match="noise_or_shape"):
        fs.sample(eps_model(), 3.5)
    with pytest.raises(ValueError, match="positive sizes"):
        fs.sample(eps_model(), (0, 2))


def test_bad_seed():
    with pytest.raises(TypeError, match="seed must be"):
        fs.sample(eps_model(), (2, 2), seed="zero")


def test_bad_backend():
    with pytest.raises(ValueError, match="backend="):
        fs.sample(eps_model(), (2, 2), backend="gpu")


def test_bad_sample_offset():
    with pytest.raises(ValueError, match="sample_offset"):
        fs.sample(eps_model(), (2, 2), sample_offset=-1)


def test_grid_and_range_together():
    with pytest.raises(ValueError, match="not both"):
        fs.sample(eps_model(), (2, 2), grid=[1.0, 0.5], t_min=0.1)


def test_steps_and_grid_length_disagree():
    with pytest.raises(ValueError, match="steps=5 but the grid has 3 points"):
        fs.sample(eps_model(), (2, 2), grid=[1.0, 0.5, 0.1], steps=5)


def test_path_type_checked():
    with pytest.raises(TypeError, match="path must be a flowsolve.paths object"):
        fs.Model(lambda x, t: x, "vp")
