"""``python -m bench gpu`` without a GPU: it refuses with a clear message, and its sections' code runs on CPU at
tiny sizes through Triton's interpreter (so the one GPU command is not first exercised on the GPU)."""
import pytest
import torch

from bench import gpu
from flowsolve.kernels.backend import HAS_TRITON, interpreting

needs_triton = pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs triton + TRITON_INTERPRET=1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda_and_names_the_alternatives(capsys, tmp_path):
    assert gpu.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "python -m bench kernels" in err
    assert not any(tmp_path.iterdir())


def test_only_rejects_unknown_sections():
    with pytest.raises(SystemExit):
        gpu.main(["--only", "kernels,warp"])


@needs_triton
def test_kernels_section_runs_and_its_checks_hold_where_the_interpreter_is_exact(monkeypatch):
    monkeypatch.setenv("FLOWSOLVE_BACKEND", "triton")  # the "device" side: the Triton kernels, interpreted
    res = gpu.kernels_section("cpu", quick=True)
    assert res["noise_words"]["ok"]  # Philox words: bitwise
    # the interpreter casts fp32 -> bf16 by truncation (compiled Triton rounds to nearest): bf16 outputs may sit
    # one bf16 ulp off; everything else within its bound
    bad = [r for r in res["lincomb"] + res["embedded"] if not r["ok"] and "bfloat16" not in r["case"]]
    assert not bad, bad
    assert all(r["ok"] for r in res["probes"] if "rademacher" in r["case"] or "hutchinson" in r["case"])
    assert res["noise_floats"]["max_ulps"] <= 4  # the interpreter's float32 log: a few ulp (see test_noise_format)
    assert set(res["box_muller_exhaustive"]) == {"radius", "angle"}
    md = gpu.markdown({"environment": {"date": "d", "torch": "t", "noise_format": 2}, "sections": ["kernels"],
                       "kernels": res})
    assert "Kernels against their twins" in md


@needs_triton
def test_solvers_section_runs_on_the_triton_path(monkeypatch):
    import flowsolve as fs

    monkeypatch.setenv("FLOWSOLVE_BACKEND", "triton")
    some = {"euler", "dpm++2m", "dpm++3m-sde", "unipc3-bh2", "restart"}  # one of each kind (interpreter time)
    res = gpu.solvers_section("cpu", quick=True, only=some)
    assert {r["solver"] for r in res["solvers"]} == some and some <= {s.name for s in fs.solvers()}
    assert res["ok"], [r for r in res["solvers"] if not r["ok"]] or res["likelihood"]
