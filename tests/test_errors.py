"""Bad input gets a clear exception naming the argument and the fix."""
import pytest
import torch

import flowsolve as fs
from flowsolve.checks import check_model  # also fs.check_model once exported

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
    with pytest.raises(ValueError, match=r"0.0 <= t_min < t_max <= 1.0 for VP; got t_min=-0.1"):
        fs.sample(eps_model(), (2, 2), steps=3, t_min=-0.1)
    with pytest.raises(ValueError, match=r"t_min < t_max .*got t_min=0.5, t_max=0.4"):
        fs.sample(eps_model(), (2, 2), steps=3, t_min=0.5, t_max=0.4)
    with pytest.raises(ValueError, match=r"t_min < t_max .*got t_min=0.5, t_max=0.5"):
        fs.sample(eps_model(), (2, 2), steps=3, t_min=0.5, t_max=0.5)


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
    with pytest.raises(TypeError, match=r"initial state has dtype torch.int64; pass a floating-point tensor"):
        fs.sample(eps_model(), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"initial state has dtype torch.bool; pass a floating-point tensor"):
        fs.sample(eps_model(), torch.zeros(2, 2, dtype=torch.bool))
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
    with pytest.raises(TypeError, match=r"noise_or_shape=3.5: pass a tensor x\(t_max\) or a shape of ints"):
        fs.sample(eps_model(), 3.5)
    with pytest.raises(TypeError, match=r"noise_or_shape=\(2.5, 2\).*shape of ints like \(B, D\)"):
        fs.sample(eps_model(), (2.5, 2))
    with pytest.raises(ValueError, match=r"noise_or_shape=\(0, 2\) must be batch-first with positive sizes, e.g."):
        fs.sample(eps_model(), (0, 2))


def test_bad_seed():
    with pytest.raises(TypeError, match="seed must be an int, a torch.Generator, a one-element tensor or None; got str"):
        fs.sample(eps_model(), (2, 2), seed="zero")


def test_bad_backend():
    with pytest.raises(ValueError, match=r"backend='gpu' is not one of .*pass backend='auto'"):
        fs.sample(eps_model(), (2, 2), backend="gpu")


def test_bad_sample_offset():
    with pytest.raises(ValueError, match=r"sample_offset=-1 must be a non-negative int \(the global index of x\[0\]\)"):
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


# ---------------------------------------------------------------------------------------------- issue 8 catalog
def test_solver_typo_suggests_the_nearest_name():
    with pytest.raises(ValueError, match=r"unknown solver 'dpm\+\+2n'; registered solvers: .*Did you mean 'dpm\+\+2m'"):
        fs.sample(eps_model(), (2, 2), solver="dpm++2n")


@pytest.mark.parametrize("steps", [2.0, "3", True])
def test_steps_of_wrong_type(steps):
    with pytest.raises(TypeError, match=r"steps must be a positive int; got"):
        fs.sample(eps_model(), (2, 2), steps=steps)


def test_steps_with_adaptive_solver():
    with pytest.raises(ValueError, match=r"solver='dopri5' is adaptive.*do not pass steps or grid.*'rk4'"):
        fs.sample(eps_model(), (2, 2), solver="dopri5", steps=8)


@pytest.mark.parametrize("rtol", [0.0, -1e-3, float("inf")])
def test_rtol_not_positive(rtol):
    with pytest.raises(ValueError, match=r"rtol=.* must be a positive finite number"):
        fs.sample(eps_model(), (2, 2), solver="dopri5", rtol=rtol)


def test_rtol_with_fixed_step_solver():
    with pytest.raises(ValueError, match=r"rtol/atol apply to adaptive solvers .*'heun' takes steps= and grid= instead"):
        fs.sample(eps_model(), (2, 2), solver="heun", rtol=1e-3)


def test_t_min_not_finite():
    with pytest.raises(ValueError, match=r"t_min=nan must be a finite number"):
        fs.sample(eps_model(), (2, 2), steps=2, t_min=float("nan"))


def test_float16_state_dtype_rejected_but_half_tensor_promoted():
    with pytest.raises(TypeError, match=r"dtype=torch.float16: the solver state must be torch.float32 or torch.float64"):
        fs.sample(eps_model(), (2, 2), dtype=torch.float16)
    x = fs.sample(eps_model(), torch.randn(2, 2).half(), steps=2)  # documented: promoted to a float32 state
    assert x.dtype == torch.float32


@pytest.mark.parametrize("shape", [(0, 2), (2, 0)])
def test_empty_state_tensor(shape):
    with pytest.raises(ValueError, match=r"has shape .* with an empty dimension; pass B >= 1 samples"):
        fs.sample(eps_model(), torch.zeros(shape))


def test_model_returning_integer_dtype():
    m = fs.Model(lambda x, t: x.long(), VP)
    with pytest.raises(TypeError, match=r"model returned dtype torch.int64; fn\(x, t\) must return a floating-point eps"):
        fs.sample(m, (2, 2), steps=2)


def test_model_output_on_another_device():
    m = fs.Model(lambda x, t: torch.empty_like(x, device="meta"), VP)
    with pytest.raises(ValueError, match=r"output is on meta but its input x is on cpu; move the model to x's device"):
        fs.sample(m, (2, 2), steps=2)


def test_nan_initial_state_with_check_finite():
    x = torch.zeros(3, 2)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"initial state contains NaN/inf in samples \[1\]; pass finite values"):
        fs.sample(eps_model(), x, steps=2, check_finite=True)


@pytest.mark.parametrize("seed, err, msg", [
    (1.5, TypeError, "got float"),
    (True, TypeError, "got bool"),
    (2**70, ValueError, "does not fit in int64"),
    (torch.tensor(1.0), TypeError, "seed tensor must hold one integer"),
])
def test_seed_of_wrong_type(seed, err, msg):
    with pytest.raises(err, match=msg):
        fs.sample(eps_model(), (2, 2), steps=2, seed=seed)


def test_sample_offset_float_and_overflow():
    with pytest.raises(ValueError, match=r"sample_offset=1.0 must be a non-negative int"):
        fs.sample(eps_model(), (2, 2), steps=2, sample_offset=1.0)
    with pytest.raises(ValueError, match=r"sample_offset=4294967295: global sample indices must lie in \[0, 2\^32\)"):
        fs.sample(eps_model(), (2, 2), steps=2, sample_offset=2**32 - 1)


def test_callback_not_callable():
    with pytest.raises(TypeError, match=r"callback=3 is not callable; pass a function callback\(step, t, x, denoised\)"):
        fs.sample(eps_model(), (2, 2), steps=2, callback=3)


def test_bad_device_name_and_device_mismatch():
    with pytest.raises(ValueError, match=r"device='tpu' is not a torch device; pass e.g. 'cpu'"):
        fs.sample(eps_model(), (2, 2), steps=2, device="tpu")
    with pytest.raises(ValueError, match=r"device='meta' but the initial state is on cpu; .*drop device= or move"):
        fs.sample(eps_model(), torch.zeros(2, 2), steps=2, device="meta")


def test_flags_must_be_bool():
    with pytest.raises(TypeError, match=r"return_info='yes' must be True or False"):
        fs.sample(eps_model(), (2, 2), steps=2, return_info="yes")
    with pytest.raises(TypeError, match=r"check_finite=1 must be True or False"):
        fs.Model(lambda x, t: x, VP, check_finite=1)


# --------------------------------------------------------------------------- a model that mixes samples
class _BatchMean:
    def __call__(self, x, t):
        return x - x.mean(0, keepdim=True)


def test_check_model_flags_batch_statistics():
    with pytest.raises(ValueError, match=r"model mixes samples: perturbing sample 0 changed the outputs of samples "
                                         r"\[1, 2, 3\].*per sample.*eval\(\) mode"):
        check_model(fs.Model(_BatchMean(), VP), torch.randn(4, 3))


def test_check_model_flags_batchnorm_in_train_mode_not_in_eval():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    model = fs.Model(lambda x, t: net(x), VP)
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"model mixes samples: perturbing sample 2 changed the outputs of samples "
                                         r"\[0, 1, 3, 4\]"):
        check_model(model, x, 0.5, sample=2)
    net.eval()
    check_model(model, x, 0.5, sample=2)  # per-sample in eval mode: no error


def test_check_model_passes_independent_model_and_sample_flag():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))
    model = fs.Model(lambda x, t: net(x) * t[:, None], VP)
    check_model(model, torch.randn(6, 3))
    x = fs.sample(model, (4, 3), steps=2, check_independence=True)
    assert x.shape == (4, 3)
    with pytest.raises(ValueError, match="model mixes samples"):
        fs.sample(fs.Model(_BatchMean(), VP), (4, 3), steps=2, check_independence=True)
    with pytest.raises(ValueError, match=r"sample=9 must be an int in \[0, 4\)"):
        check_model(model, torch.randn(4, 3), sample=9)


# ---------------------------------------------------------------------------- log_likelihood
X = torch.randn(3, 2)


def test_likelihood_errors():
    m = eps_model()
    with pytest.raises(TypeError, match=r"model must be a fs.Model; wrap your callable"):
        fs.log_likelihood(lambda x, t: x, X)
    with pytest.raises(TypeError, match=r"x has dtype torch.int64.*dequantize"):
        fs.log_likelihood(m, X.long())
    with pytest.raises(ValueError, match=r"steps=0 must be >= 1"):
        fs.log_likelihood(m, X, steps=0)
    with pytest.raises(ValueError, match=r"unknown likelihood solver 'hen'.*Did you mean 'heun'"):
        fs.log_likelihood(m, X, solver="hen")
    with pytest.raises(ValueError, match=r"probes=0 must be >= 1"):
        fs.log_likelihood(m, X, divergence="hutchinson", probes=0)
    with pytest.raises(ValueError, match=r"divergence='exakt' is not one of .*Did you mean 'exact'"):
        fs.log_likelihood(m, X, divergence="exakt")


def test_likelihood_tolerances_with_fixed_grid_solver():
    with pytest.raises(ValueError, match=r"rtol/atol/h0 apply to the adaptive solvers .*solver='heun'.*pass steps="):
        fs.log_likelihood(eps_model(), X, solver="heun", rtol=1e-3)


def test_likelihood_steps_with_adaptive_and_nan_and_empty():
    with pytest.raises(ValueError, match=r"solver='dopri5' is adaptive.*do not pass steps"):
        fs.log_likelihood(eps_model(), X, solver="dopri5", steps=4)
    bad = X.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"x contains NaN/inf in samples \[2\]; the log-likelihood needs finite data"):
        fs.log_likelihood(eps_model(), bad)
    with pytest.raises(ValueError, match=r"x must be batch-first .*no empty dimension.*x.reshape\(B, -1\)"):
        fs.log_likelihood(eps_model(), torch.zeros(3, 0))


# ---------------------------------------------------------------------------- odeint / sdeint / langevin / distributed
def test_odeint_errors():
    f = lambda x, t: -x  # noqa: E731
    with pytest.raises(TypeError, match=r"x0 has dtype torch.int64; pass a floating-point tensor"):
        fs.odeint(f, torch.zeros(2, 2, dtype=torch.int64), [0.0, 1.0])
    with pytest.raises(ValueError, match=r"t must hold at least 2 times"):
        fs.odeint(f, torch.zeros(2, 2), [0.0])
    with pytest.raises(ValueError, match=r"unknown odeint solver 'rk5'.*Did you mean 'rk4'"):
        fs.odeint(f, torch.zeros(2, 2), [0.0, 1.0], solver="rk5")
    with pytest.raises(ValueError, match=r"f returned shape \(1, 2\) but x has shape \(2, 2\); f\(x, t\) must return"):
        fs.odeint(lambda x, t: x[:1], torch.zeros(2, 2), [0.0, 1.0])
    with pytest.raises(ValueError, match=r"rtol=0 must be a positive finite number"):
        fs.odeint(f, torch.zeros(2, 2), [0.0, 1.0], solver="dopri5", rtol=0)
    with pytest.raises(ValueError, match=r"strictly monotone"):
        fs.odeint(f, torch.zeros(2, 2), [0.0, 1.0, 0.5])


def test_sdeint_errors():
    f = lambda x, t: -x  # noqa: E731
    with pytest.raises(TypeError, match=r"g must be callable as g\(x, t\)"):
        fs.sdeint(f, 3, torch.zeros(2, 2), [0.0, 1.0])
    with pytest.raises(ValueError, match=r"solver='euler_maruyamma' is not one of .*Did you mean 'euler_maruyama'"):
        fs.sdeint(f, f, torch.zeros(2, 2), [0.0, 1.0], solver="euler_maruyamma")


def test_langevin_errors():
    with pytest.raises(ValueError, match=r"step_size=0.0 must be a positive number"):
        fs.langevin(lambda x: -x, torch.zeros(2, 2), 0.0, 3)
    with pytest.raises(ValueError, match=r"n_steps=3.0 must be a positive int"):
        fs.langevin(lambda x: -x, torch.zeros(2, 2), 0.1, 3.0)


def test_distributed_needs_a_process_group():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match=r"needs an initialized process group: call torch.distributed.init_process_group"):
        fs.distributed.sample_distributed(eps_model(), (4, 2), seed=0)


def test_path_argument_helper():
    """flowsolve.checks.check_path_args: the validation the path constructors call (paths.py wiring reported)."""
    from flowsolve.checks import check_path_args

    with pytest.raises(ValueError, match=r"VP\(beta_min=-1.0\): beta_min must be >= 0"):
        check_path_args("VP", nonnegative=[("beta_min", -1.0)])
    with pytest.raises(ValueError, match=r"VE\(sigma_min=10.0, sigma_max=1.0\): need sigma_min < sigma_max; swap them"):
        check_path_args("VE", increasing=(("sigma_min", 10.0), ("sigma_max", 1.0)))
    with pytest.raises(ValueError, match=r"EDM\(sigma_min=0.0\): sigma_min must be > 0"):
        check_path_args("EDM", positive=[("sigma_min", 0.0)])
    with pytest.raises(ValueError, match=r"RectifiedFlow\(t_min=0.0, t_max=2.0\): need 0.0 <= t_min < t_max <= 1.0"):
        check_path_args("RectifiedFlow", t_min=0.0, t_max=2.0)
    with pytest.raises(ValueError, match=r"VP\(s=nan\): s must be a finite number"):
        check_path_args("VP", positive=[("s", float("nan"))])
    check_path_args("VP", t_min=1e-3, t_max=1.0, nonnegative=[("beta_min", 0.1)],
                    increasing=(("beta_min", 0.1), ("beta_max", 20.0)))


def test_float32_run_that_would_underflow_or_overflow_is_refused():
    """A t_min that is zero or subnormal in float32 (the float32 model would see another time than planned,
    and coefficients like 1/t overflow): refused for a float32 state, with the fix; fine in float64."""
    rf = fs.paths.RectifiedFlow()
    m = fs.Model(lambda x, t: 0.5 * x, rf, predicts="x0")
    for solver in ("euler", "bosh3"):
        with pytest.raises(ValueError, match=r"reaches t=3.8e-213, below float32's smallest normal.*Raise t_min.*float64"):
            fs.sample(m, (2, 2), solver=solver, t_max=0.5, t_min=3.8e-213)
    x = fs.sample(m, (2, 2), solver="euler", steps=3, t_max=0.5, t_min=3.8e-213, dtype=torch.float64)
    assert bool(torch.isfinite(x).all())


def test_likelihood_float32_range_below_normal_numbers_is_refused():
    rf = fs.paths.RectifiedFlow()
    m = fs.Model(lambda x, t: 0.5 * x, rf, predicts="x0")
    with pytest.raises(ValueError, match=r"reaches t=1e-300, below float32's smallest normal.*Raise t_min"):
        fs.log_likelihood(m, X, solver="euler", grid="uniform", t_max=1.0, t_min=1e-300)


def test_likelihood_never_returns_a_silent_nan():
    """An x0-model on rectified flow has velocity (x - x0) / t: from t_min = 1e-300 one Euler step overflows
    float64. The result is refused with the fix instead of returned as NaN."""
    rf = fs.paths.RectifiedFlow()
    prob = fs.analytic.Gaussian(torch.zeros(1, dtype=torch.float64), torch.full((1,), 0.8, dtype=torch.float64), rf)
    m = fs.Model(prob.x0, rf, predicts="x0")
    with pytest.raises(FloatingPointError, match=r"log_likelihood gave NaN/inf for samples \[0\].*Raise t_min"):
        fs.log_likelihood(m, torch.full((1, 1), 0.3, dtype=torch.float64), solver="euler", grid="uniform", t_max=1.0,
                          t_min=1e-300)


@pytest.mark.parametrize("make, needle", [
    (lambda: fs.paths.VP(beta_min=-1), "beta_min must be >= 0"),
    (lambda: fs.paths.SubVP(beta_max=0), "beta_max must be > 0"),
    (lambda: fs.paths.VPCosine(s=0), "s must be > 0"),
    (lambda: fs.paths.VE(sigma_min=10, sigma_max=1), "need sigma_min < sigma_max; swap them"),
    (lambda: fs.paths.EDM(sigma_min=0), "sigma_min must be > 0"),
    (lambda: fs.paths.RectifiedFlow(t_max=2), r"need 0.0 <= t_min < t_max <= 1.0"),
    (lambda: fs.paths.VP(t_min=0.5, t_max=0.5), "need 0.0 <= t_min < t_max"),
])
def test_path_constructors_name_the_bad_argument(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_a_model_that_differentiates_inside_gets_the_enable_grad_fix():
    # sampling runs under torch.no_grad() (like k-diffusion's samplers): an energy-based score -grad E(x)
    # must take its gradient under torch.enable_grad(); without it the error says so, with it it samples
    mu = torch.tensor([1.0, -2.0])
    path = fs.paths.VE()

    def energy(x, t):
        var = (1.0 + path.sigma(t) ** 2)[:, None]
        return ((x - mu.to(x.dtype)) ** 2 / (2 * var)).sum()

    def naive(x, t):
        x = x.requires_grad_()
        return -torch.autograd.grad(energy(x, t), x)[0]

    def fixed(x, t):
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            return -torch.autograd.grad(energy(x, t), x)[0]

    with pytest.raises(RuntimeError, match="torch.enable_grad"):
        fs.sample(fs.Model(naive, path, predicts="score"), (64, 2), solver="heun", steps=4, seed=0)
    x = fs.sample(fs.Model(fixed, path, predicts="score"), (256, 2), solver="heun", steps=8, seed=0,
                  dtype=torch.float64)
    # -grad E is the exact score of N(mu, I) data on VE: the same run with the closed-form score agrees to rounding
    exact = fs.analytic.Gaussian(mu.double(), torch.ones(2, dtype=torch.float64), path)
    ref = fs.sample(fs.Model(exact.score, path, predicts="score"), (256, 2), solver="heun", steps=8, seed=0,
                    dtype=torch.float64)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
