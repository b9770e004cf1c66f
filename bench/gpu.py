"""``python -m bench gpu``: everything a GPU can tell us, in one command (about 5 minutes on an H100/H200).

Sections (``--only`` takes a comma-separated subset; each writes its part of ``<out>/gpu.{json,md}`` as soon
as it finishes, so a run cut short keeps what it measured):

* ``kernels`` — every kernel against its twin on CUDA, over awkward shapes (1, 7, 1023, 4097, [3, 5, 7],
  2^24 + 3) and every dtype triple of the Triton path, noise and probes included, each error against a
  bound derived from the accumulation and output precisions (pass = error <= bound). The noise's Philox
  words from a probe kernel equal the CPU twin's bitwise (including counters near 2^32 and 64-bit seeds);
  the floats' distance to the CPU twin in ulps (histogram), and exhaustively over the format's inputs:
  all 2^23 radius words and all 2^24 angle words of the Box-Muller transform.
* ``solvers`` — every fixed-step solver on CUDA float32 (Triton kernels) against the CPU float64 run of the
  same plan from the same x(t_max) and seed (relative L2 error; bound 1e-4, fp32 unit roundoff 6e-8 times a
  growth of up to ~1600), and ``cuda_graph=True`` bitwise equal to eager.
* ``bandwidth`` — GB/s of ``lincomb`` K = 2, 3 with and without noise, the keyed normal and the Hutchinson
  accumulation (stored and regenerated probes) against ``out.copy_(x)`` into preallocated memory, 2^20..2^28
  float32 elements (CUDA events, medians).
* ``loops`` — whole 10- and 20-step loops (dpm++2m, euler) at [1, 4, 32, 32], [16, 4, 64, 64] and
  [64, 4, 64, 64] with a small diffusers ``UNet2DModel`` built from a config (no download): flowsolve eager,
  flowsolve with ``cuda_graph=True``, k-diffusion and diffusers on the same model callable, sigmas and NFE;
  overhead per step = (loop - NFE x model) / steps, and its ratio to k-diffusion's.
* ``compile`` — ``torch.compile`` of ``Sampler.sample`` (heun, 10 steps): compile time and speedup, with the
  Triton kernels (backend auto) and with the torch twins (inductor generates the kernels).

Refuses to run without CUDA. ``--quick`` uses small sizes (a smoke run; the sections' functions also run on
CPU at tiny sizes in tests/test_bench_gpu.py, through Triton's interpreter).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

SECTIONS = ("kernels", "solvers", "bandwidth", "loops", "compile")
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
TINY = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134, torch.float32: 2.0**-150, torch.float64: 0.0}  # half the subnormal spacing

try:
    import triton
    import triton.language as tl

    from flowsolve.kernels import philox
except ImportError:  # pragma: no cover - bench gpu needs triton (it comes with CUDA torch on Linux)
    triton = None

if triton is not None:
    @triton.jit
    def _words_probe(out_ptr, seed_ptr, sample0, step, stream, group0, n_groups, G: tl.constexpr, R: tl.constexpr):
        """The four Philox words of R samples x G groups (program p: groups group0 + p G ...), as int64."""
        rows = tl.arange(0, R).to(tl.int64)[:, None] + sample0
        g = group0 + tl.program_id(0).to(tl.int64) * G + tl.arange(0, G).to(tl.int64)[None, :]
        r0, r1, r2, r3 = philox.keyed_words(tl.load(seed_ptr), rows, step, g, stream)
        base = (tl.arange(0, R)[:, None] * n_groups + tl.program_id(0) * G + tl.arange(0, G)[None, :]) * 4
        tl.store(out_ptr + base + 0, r0.to(tl.int64))
        tl.store(out_ptr + base + 1, r1.to(tl.int64))
        tl.store(out_ptr + base + 2, r2.to(tl.int64))
        tl.store(out_ptr + base + 3, r3.to(tl.int64))

    @triton.jit
    def _box_muller_probe(ra_ptr, rb_ptr, zc_ptr, zs_ptr, n, BLOCK: tl.constexpr):
        """box_muller of given word pairs (int64 arrays holding 32-bit words)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        ra = tl.load(ra_ptr + i, mask=m, other=0).to(tl.uint32)
        rb = tl.load(rb_ptr + i, mask=m, other=0).to(tl.uint32)
        zc, zs = philox.box_muller(ra, rb)
        tl.store(zc_ptr + i, zc, mask=m)
        tl.store(zs_ptr + i, zs, mask=m)


def _name(d) -> str:
    return str(d).replace("torch.", "")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, device, repeats: int = 7) -> dict:
    """Median seconds per call of each callable, timed round-robin (each round calls every one once, after a
    warm-up), so that clock and load changes affect all alike."""
    for f in fns.values():
        f()
    sync(device)
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def warm_up(device, seconds: float = 3.0) -> None:
    """Keep the GPU busy for a few seconds so that its clocks are up before anything is timed."""
    if torch.device(device).type != "cuda":
        return
    a = torch.randn(4096, 4096, device=device)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = (a @ a).clamp_(-1, 1)
        sync(device)


def timed(fn, device, repeats: int = 15, min_time: float = 2e-3) -> float:
    """Median seconds per call (CUDA events on a GPU, perf_counter on CPU), calls batched to >= min_time."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    inner = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
    samples = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


# ============================================================================================== kernels
def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in float32 ulps (of the larger magnitude) between two float32 tensors."""
    a, b = a.double(), b.double()
    mag = torch.maximum(a.abs(), b.abs()).clamp_min(2.0**-126)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 23)
    return ((a - b).abs() / ulp).round()


def _hist(u: torch.Tensor) -> dict:
    return {"0": int((u == 0).sum()), "1": int((u == 1).sum()), "2": int((u == 2).sum()), ">2": int((u > 2).sum()),
            "max": float(u.max()) if u.numel() else 0.0}


def _check(name: str, got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> dict:
    err = (got.double().cpu() - ref).abs()
    ratio = float((err / bound.clamp_min(1e-300)).max()) if err.numel() else 0.0
    return {"case": name, "max_err": float(err.max()) if err.numel() else 0.0, "err_over_bound": ratio,
            "ok": bool(ratio <= 1.0) and bool(torch.isfinite(got).all())}


def kernels_section(device, quick: bool = False) -> dict:
    import flowsolve.kernels as K
    from flowsolve.kernels import philox
    from flowsolve.kernels.hutchinson import hutchinson_accumulate, probes_
    from flowsolve.kernels.lincomb import TRITON_DTYPES, TRITON_NOISE_DTYPES

    dev = torch.device(device)
    shapes = [(7,), (3, 5, 7)] if quick else [(1,), (7,), (1023,), (4097,), (3, 5, 7), (2**24 + 3,)]
    ks = (1, 3) if quick else (1, 2, 3, 8)
    gen = torch.Generator().manual_seed(0)
    seed_cpu = torch.tensor([1234567890123], dtype=torch.int64)
    seed, step = seed_cpu.to(dev), torch.tensor([7], dtype=torch.int64, device=dev)
    rows = []

    def inputs(shape, k, dtype):
        return [torch.randn(shape, generator=gen).to(dtype) for _ in range(k)]

    for shape in shapes:
        big = math.prod(shape) > 2**20
        for din, dacc, dout in TRITON_DTYPES:
            for k in ((3,) if big else ks):
                xs = inputs(shape, k, din)
                coef = torch.randn(8, k + 1, generator=gen, dtype=torch.float64).to(dacc)
                got = K.lincomb(torch.empty(shape, dtype=dout, device=dev), [x.to(dev) for x in xs], coef.to(dev), step)
                c = coef[7].double()
                terms = sum(c[i].abs() * xs[i].double().abs() for i in range(k))
                ref = sum(c[i] * xs[i].double() for i in range(k))
                bound = 2 * (k + 1) * UNIT[dacc] * terms + UNIT[dout] * ref.abs() + TINY[dout]
                rows.append(_check(f"lincomb K={k} {_name(din)}/{_name(dacc)}/{_name(dout)} {list(shape)}", got, ref, bound))
        for din, dacc, dout in TRITON_NOISE_DTYPES:
            for k in ((3,) if big else (range(1, 9) if not quick else (1, 3))):
                xs = inputs(shape, k, din)
                coef = torch.randn(8, k + 1, generator=gen, dtype=torch.float64).to(dacc)
                z = K.normal_(torch.empty(shape), seed_cpu, step.cpu(), backend="torch").double()
                got = K.lincomb(torch.empty(shape, dtype=dout, device=dev), [x.to(dev) for x in xs], coef.to(dev), step,
                                seed)
                c = coef[7].double()
                terms = sum(c[i].abs() * xs[i].double().abs() for i in range(k)) + c[k].abs() * z.abs()
                ref = sum(c[i] * xs[i].double() for i in range(k)) + c[k] * z
                # the GPU's z may differ from the twin's by a few float32 ulps (its log): 4 ulp of z allowed
                bound = 2 * (k + 2) * UNIT[dacc] * terms + UNIT[dout] * ref.abs() + c[k].abs() * 4 * 2.0**-23 * z.abs().clamp_min(2.0**-126)
                rows.append(_check(f"lincomb+noise K={k} {_name(din)} {list(shape)}", got, ref, bound))
        for din, dacc, dout in TRITON_NOISE_DTYPES:  # two outputs in one launch (multistep history + update)
            for noise in (False, True):
                k = 4
                xs = inputs(shape, k, din)
                coef = torch.randn(8, k + 1, generator=gen, dtype=torch.float64).to(dacc)
                coef2 = torch.randn(8, k, generator=gen, dtype=torch.float64).to(dacc)
                x_dev = [x.to(dev).clone() for x in xs]  # input 0 is overwritten in place
                out2 = torch.empty(shape, dtype=dout, device=dev)
                z = K.normal_(torch.empty(shape), seed_cpu, step.cpu(), backend="torch").double() if noise else 0
                got = K.lincomb(x_dev[0], x_dev, coef.to(dev), step, seed if noise else None, out2=out2,
                                coef2=coef2.to(dev))  # out aliases input 0, which out2 also reads
                c, c2 = coef[7].double(), coef2[7].double()
                for name, g, cc, extra in (("out", got, c, c[k] * z if noise else 0), ("out2", out2, c2, 0)):
                    terms = sum(cc[i].abs() * xs[i].double().abs() for i in range(k)) + (abs(extra) if noise else 0)
                    ref = sum(cc[i] * xs[i].double() for i in range(k)) + extra
                    bound = 2 * (k + 2) * UNIT[dacc] * terms + UNIT[dout] * ref.abs() + TINY[dout] + (
                        c[k].abs() * 4 * 2.0**-23 * z.abs() if noise and name == "out" else 0)
                    rows.append(_check(f"lincomb two outputs ({name}){' +noise' if noise else ''} K={k} {_name(din)} "
                                       f"{list(shape)}", g, ref, bound))
    out = {"lincomb": rows}
    out["noise_words"] = _noise_words(dev, quick)
    out["noise_floats"] = _noise_floats(dev, seed_cpu, quick)
    out["box_muller_exhaustive"] = _box_muller_exhaustive(dev, quick)
    # probes: Rademacher bitwise, Gaussian in ulps; Hutchinson accumulation with stored and regenerated probes
    pr = []
    for kind in ("rademacher", "gaussian"):
        for shape in ((2, 3, 5, 7), (1, 4, 4097)):
            a = probes_(torch.empty(shape, device=dev), seed, kind=kind, sample_offset=5, probe_offset=2).cpu()
            b = probes_(torch.empty(shape), seed_cpu, kind=kind, sample_offset=5, probe_offset=2, backend="torch")
            h = _hist(_ulps(a, b))
            pr.append({"case": f"probes_ {kind} {list(shape)}", "bitwise": bool(torch.equal(a, b)), "ulps": h,
                       "ok": bool(torch.equal(a, b)) if kind == "rademacher" else h[">2"] == 0})
    for regen in (False, True):
        for per in (3, 5000):
            kb = (2, 6)
            vjp = torch.randn(kb + (per,), generator=gen)
            z = probes_(torch.empty(kb + (per,)), seed_cpu, kind="rademacher", backend="torch")
            coef = torch.tensor([[0.7, -0.3]]).expand(8, 2)  # row 7: the step index
            ref = (0.7 * (z.double() * vjp.double()).sum(-1) - 0.3 * (z.double() ** 2).sum(-1))
            acc = torch.zeros(kb, device=dev)
            hutchinson_accumulate(acc, vjp.to(dev), coef.to(dev), step, None if regen else z.to(dev), seed)
            bound = 2 * (per + 2) * UNIT[torch.float32] * (0.7 * (z.double() * vjp.double()).abs().sum(-1) + 0.3 * per)
            pr.append(_check(f"hutchinson {'regenerated' if regen else 'stored'} probes per={per}", acc, ref, bound))
    out["probes"] = pr
    out["embedded"] = _embedded_rows(dev, gen, seed, seed_cpu, step)
    every = [r for part in ("lincomb", "probes", "embedded") for r in out[part]]
    out["ok"] = all(r["ok"] for r in every) and out["noise_words"]["ok"] and out["noise_floats"]["ok"]
    out["cases"] = len(every)
    return out


def _embedded_rows(dev, gen, seed, seed_cpu, step):
    import flowsolve.kernels as K

    rows = []
    for b, per in ((3, 5), (4, 1000), (2, 9000)):
        for noise in (False, True):
            xs = [torch.randn(b, per, generator=gen) for _ in range(3)]
            x_ref = torch.randn(b, per, generator=gen)
            coef = torch.tensor([[1.0, 0.1, -0.05, 0.02]]).expand(16, 4).contiguous()
            ecoef = torch.tensor([[0.0, 1e-3, -2e-3, 1e-3]]).expand(16, 4)[:, :3].contiguous()
            args = dict(x_ref=x_ref, rtol=1e-3, atol=1e-6)
            a, na = K.embedded_step(torch.empty(b, per, device=dev), torch.empty(b, device=dev), [x.to(dev) for x in xs],
                                    coef.to(dev), ecoef.to(dev), step, x_ref=x_ref.to(dev), rtol=1e-3, atol=1e-6,
                                    seed=seed if noise else None)
            t, nt = K.embedded_step(torch.empty(b, per), torch.empty(b), xs, coef, ecoef, step.cpu(),
                                    seed=seed_cpu if noise else None, backend="torch", **args)
            scale = sum(x.abs() for x in xs).double() * 0.1 + (x_ref.abs() if noise else 0)
            rows.append(_check(f"embedded out {b}x{per}{' +noise' if noise else ''}", a, t.double(),
                               16 * UNIT[torch.float32] * (scale + t.double().abs()) + (4 * 2.0**-23 * 0.02 if noise else 0)))
            rows.append(_check(f"embedded norm {b}x{per}{' +noise' if noise else ''}", na, nt.double(),
                               1e-5 * nt.double().abs() + 1e-12))
    return rows


def _noise_words(dev, quick) -> dict:
    """Philox words of the GPU's keyed_words == the CPU twin's, bitwise, at ordinary and extreme counters/seeds."""
    from flowsolve.kernels.philox import keyed_words_torch

    words = _words_probe
    cases = [(0, 0, 3, 0, 0), (-1, 2**32 - 16, 2**32 - 1, 8, 2**30 - 4096), (2**40 + 12345, 1000, 123456, 3, 7)]
    R, G, nprog = 16, 256, 2 if quick else 16
    rows, ok = [], True
    for seed_v, sample0, step_v, stream, group0 in cases:
        out = torch.zeros(R, nprog * G, 4, dtype=torch.int64, device=dev)
        seed = torch.tensor([seed_v], dtype=torch.int64, device=dev)
        words[(nprog,)](out, seed, sample0, step_v, stream, group0, nprog * G, G=G, R=R)
        samples = torch.arange(R, dtype=torch.int64).view(-1, 1) + sample0
        groups = torch.arange(nprog * G, dtype=torch.int64).view(1, -1) + group0
        ref = keyed_words_torch(torch.tensor([[seed_v]]), samples, torch.tensor([[step_v]]), groups, stream)
        ref = torch.stack(torch.broadcast_tensors(*ref), -1)
        same = bool(torch.equal(out.cpu(), ref))
        ok &= same
        rows.append({"seed": seed_v, "sample0": sample0, "step": step_v, "stream": stream, "group0": group0,
                     "words": R * nprog * G * 4, "bitwise_equal": same})
    return {"cases": rows, "ok": ok}


def _noise_floats(dev, seed_cpu, quick) -> dict:
    import flowsolve.kernels as K

    rows, worst = [], 0.0
    shapes = [(4096, 4099), (2**24 + 3,)] if not quick else [(64, 67)]
    for shape in shapes:
        step = torch.tensor([11], dtype=torch.int64)
        a = K.normal_(torch.empty(shape, device=dev), seed_cpu.to(dev), step.to(dev), sample_offset=3).cpu()
        b = K.normal_(torch.empty(shape), seed_cpu, step, sample_offset=3, backend="torch")
        h = _hist(_ulps(a, b))
        worst = max(worst, h["max"])
        rows.append({"shape": list(shape), "elements": a.numel(), "bitwise_equal": bool(torch.equal(a, b)), "ulps": h,
                     "mean": float(a.double().mean()), "var": float(a.double().var())})
    return {"cases": rows, "max_ulps": worst, "ok": worst <= 2}


def _box_muller_exhaustive(dev, quick) -> dict:
    """Every radius word (ra >> 9 over 2^23 values, rb = 0 so that z = R exactly) and every angle word (rb >> 8 over
    2^24 values, fixed ra) through the GPU's box_muller and the twin's, compared bitwise / in ulps."""
    from flowsolve.kernels.philox import _box_muller_torch

    bm = _box_muller_probe
    out = {}
    n_r = 2**12 if quick else 2**23
    ra = torch.arange(n_r, dtype=torch.int64) << 9
    rb = torch.zeros(n_r, dtype=torch.int64)
    n_a = 2**12 if quick else 2**24
    ra2 = torch.full((n_a,), 0x5A5A5A5A, dtype=torch.int64)
    rb2 = torch.arange(n_a, dtype=torch.int64) << 8
    for name, a, b in (("radius", ra, rb), ("angle", ra2, rb2)):
        zc, zs = torch.empty(a.numel(), device=dev), torch.empty(a.numel(), device=dev)
        bm[(triton_cdiv(a.numel(), 1024),)](a.to(dev), b.to(dev), zc, zs, a.numel(), BLOCK=1024, enable_fp_fusion=False)
        tc, ts = _box_muller_torch(a, b)
        uc, us = _ulps(zc.cpu(), tc), _ulps(zs.cpu(), ts)
        out[name] = {"inputs": a.numel(), "cos_lane": _hist(uc), "sin_lane": _hist(us),
                     "bitwise_equal": bool(torch.equal(zc.cpu(), tc) and torch.equal(zs.cpu(), ts))}
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ============================================================================================== solvers
def gaussian_eps(path, mu: float = 0.5, s2: float = 0.25):
    """Exact eps(x, t) for x0 ~ N(mu, s2) per dimension on a Gaussian path (device-agnostic closure)."""
    def eps(x, t):
        a = path.alpha(t).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        s = path.sigma(t).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        return s * (x - a * mu) / (a * a * s2 + s * s)
    return eps


def solvers_section(device, quick: bool = False, only=None) -> dict:
    """``only``: a subset of solver names (tests run the section's code on CPU for a few)."""
    import flowsolve as fs

    dev = torch.device(device)
    path = fs.paths.VP()
    model = fs.Model(gaussian_eps(path), path, predicts="eps")
    shape = (64, 16) if quick else (1024, 16)
    rows = []
    names = [s.name for s in fs.solvers() if not s.adaptive and (only is None or s.name in only)]
    for name in names:
        row = {"solver": name}
        try:
            sampler = fs.Sampler(model, name, steps=6 if quick else 10)
            x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * float(path.sigma(torch.tensor(sampler.t_max)))
            ref = sampler.sample(x_T.double(), seed=3, backend="torch")
            got, info = sampler.sample(x_T.to(dev), seed=3, return_info=True)
            rel = float((got.double().cpu() - ref).norm() / ref.norm())
            row.update(nfe=info["nfe"], rel_l2_vs_cpu_float64=rel, ok=rel <= 1e-4)
            if dev.type == "cuda":
                g1 = sampler.sample(x_T.to(dev), seed=3, cuda_graph=True)
                g2 = sampler.sample(x_T.to(dev), seed=3, cuda_graph=True)  # a replay of the recorded graph
                row["cuda_graph_bitwise_equal_eager"] = bool(torch.equal(g1, got) and torch.equal(g2, got))
                row["ok"] = row["ok"] and row["cuda_graph_bitwise_equal_eager"]
        except Exception as e:  # noqa: BLE001 - recorded, not hidden
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        rows.append(row)
    lik = {}
    try:
        mf = fs.Model(gaussian_eps(path), path, predicts="eps")
        n_lik, steps_lik = (16, 3) if quick else (256, 16)
        x0 = torch.randn(n_lik, 8, generator=torch.Generator().manual_seed(2))
        a = fs.log_likelihood(mf, x0.to(dev), solver="heun", steps=steps_lik, divergence="hutchinson", probes=2,
                              seed=0)
        b = fs.log_likelihood(mf, x0.double(), solver="heun", steps=steps_lik, divergence="hutchinson", probes=2,
                              seed=0, backend="torch")
        la, lb = (a[0] if isinstance(a, tuple) else a), (b[0] if isinstance(b, tuple) else b)
        lik = {"max_abs_diff_vs_cpu_float64": float((la.double().cpu() - lb).abs().max()),
               "max_abs": float(lb.abs().max())}
        lik["ok"] = lik["max_abs_diff_vs_cpu_float64"] <= 1e-4 * max(1.0, lik["max_abs"])
    except Exception as e:  # noqa: BLE001
        lik = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    return {"shape": list(shape), "solvers": rows, "likelihood": lik,
            "ok": all(r["ok"] for r in rows) and lik.get("ok", False)}


# ============================================================================================== bandwidth
def bandwidth_section(device, quick: bool = False) -> dict:
    import flowsolve.kernels as K

    dev = torch.device(device)
    sizes = [2**12, 2**14] if quick else [2**20, 2**22, 2**24, 2**26, 2**28]
    seed = torch.tensor([1], dtype=torch.int64, device=dev)
    step = torch.zeros(1, dtype=torch.int64, device=dev)
    rows = []
    for n in sizes:
        d = 4096 if n >= 4096 else n
        shape = (n // d, d)
        x, y, w, out = (torch.randn(shape, device=dev) for _ in range(4))
        c3, c4 = torch.tensor([[0.9, 0.1, 0.3]], device=dev), torch.tensor([[0.9, 0.1, 0.05, 0.3]], device=dev)
        acc = torch.zeros(1, shape[0], device=dev)
        z = K.probes_(torch.empty((1,) + shape, device=dev), seed)
        hc = torch.tensor([[0.5, 0.5]], device=dev)
        cases = {
            "copy": (lambda: out.copy_(x), 8),
            "lincomb K=2": (lambda: K.lincomb(out, [x, y], c3, step), 12),
            "lincomb K=3": (lambda: K.lincomb(out, [x, y, w], c4, step), 16),
            "lincomb K=2 +noise": (lambda: K.lincomb(out, [x, y], c3, step, seed), 12),
            "lincomb K=3 +noise": (lambda: K.lincomb(out, [x, y, w], c4, step, seed), 16),
            "keyed normal": (lambda: K.normal_(out, seed, step), 4),
            "randn (unkeyed)": (lambda: torch.randn(shape, device=dev, out=out), 4),
            "hutchinson stored probes": (lambda: K.hutchinson_accumulate(acc, x.view((1,) + shape), hc, step, z), 8),
            "hutchinson regenerated probes": (lambda: K.hutchinson_accumulate(acc, x.view((1,) + shape), hc, step, None,
                                                                              seed), 4),
        }
        res = {}
        for name, (fn, bpe) in cases.items():
            s = timed(fn, dev)
            res[name] = {"s": s, "GB_s": bpe * n / s / 1e9}
        copy = res["copy"]["GB_s"]
        for r in res.values():
            r["frac_copy"] = r["GB_s"] / copy
        rows.append({"elements": n, "cases": res})
        del x, y, w, out, z
    return {"dtype": "float32", "rows": rows}


# ============================================================================================== loops
def small_unet(sample_size: int, device):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).to(device).eval()


def edm_denoiser(unet, device):
    """D(x, sigma) in EDM space from an eps UNet on DDPM's linear betas: the UNet sees x / sqrt(1 + sigma^2) and a
    continuous timestep (log-sigma interpolated between its 1000 training steps), as k-diffusion's wrappers do."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    log_sigmas = (((1 - ac) / ac).sqrt().log()).to(device=device, dtype=torch.float32)

    def fn(x, sigma):
        s = sigma.to(x.dtype).reshape(-1)
        ls = s.clamp_min(1e-6).log()
        i = torch.searchsorted(log_sigmas, ls.contiguous()).clamp(1, 999)
        lo, hi = log_sigmas[i - 1], log_sigmas[i]
        t = (i - 1).to(x.dtype) + ((ls - lo) / (hi - lo)).clamp(0, 1)
        c = s.reshape((-1,) + (1,) * (x.dim() - 1))
        eps = unet(x / (1 + c * c).sqrt(), t).sample
        return x - c * eps

    return fn


def loops_section(device, quick: bool = False) -> dict:
    import flowsolve as fs
    from bench.loop import Counted, diffusers_loop, k_diffusion_loop, karras_sigmas
    from bench.peers import import_k_diffusion_sampling

    dev = torch.device(device)
    K = import_k_diffusion_sampling()
    warm_up(dev)
    shapes = [(1, 4, 32, 32)] if quick else [(1, 4, 32, 32), (16, 4, 64, 64), (64, 4, 64, 64)]
    rows = []
    for shape in shapes:
        unet = small_unet(shape[-1], dev)
        fn = edm_denoiser(unet, dev)
        x_T0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for steps in ((4,) if quick else (10, 20)):
                sigmas = karras_sigmas(steps)
                x_T = (x_T0 * float(sigmas[0])).to(dev)
                evals = [torch.full((shape[0],), float(v), device=dev) for v in sigmas[:-1]]
                for solver in ("dpm++2m", "euler"):
                    sampler = fs.Sampler(fs.Model(fn, fs.paths.EDM(), predicts="x0"), solver, grid=sigmas.tolist())
                    # the same NFE model calls in a bare Python loop: what a loop costs beyond it is its overhead
                    impls = {"model calls only": lambda: [fn(x_T, s) for s in evals],
                             "flowsolve eager": lambda: sampler.sample(x_T, seed=0)}
                    if dev.type == "cuda":
                        impls["flowsolve cuda_graph"] = lambda: sampler.sample(x_T, seed=0, cuda_graph=True)
                    if K is not None:
                        kd = k_diffusion_loop(K, fn, solver, sigmas.to(dev))
                        impls["k-diffusion"] = lambda kd=kd: kd(x_T)
                    d = diffusers_loop(fn, solver, steps)
                    if d is not None:
                        impls["diffusers"] = lambda d=d: d(x_T)
                    row = {"shape": list(shape), "steps": steps, "solver": solver, "impl": {}}
                    nfe, outs = {}, {}
                    for name in list(impls):
                        try:
                            nfe[name] = len(evals) if name == "model calls only" else _count(
                                name, Counted(fn), solver, sigmas, K, x_T, dev, steps, fs)
                            outs[name] = impls[name]()
                        except Exception as e:  # noqa: BLE001
                            row["impl"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                            del impls[name]
                    med = interleaved(impls, dev, repeats=7)
                    bare = med["model calls only"]
                    row["model_ms"] = 1e3 * bare / len(evals)
                    ref = outs.get("flowsolve eager")
                    for name, t in med.items():
                        if name == "model calls only":
                            continue
                        row["impl"][name] = {"loop_ms": 1e3 * t, "nfe": nfe[name],
                                             "overhead_per_step_us": 1e6 * (t - bare * nfe[name] / len(evals)) / steps,
                                             "max_abs_diff_vs_flowsolve": float((outs[name] - ref).abs().max())
                                             if ref is not None else None}
                    kd = row["impl"].get("k-diffusion", {})
                    for r in row["impl"].values():
                        if "loop_ms" in r and "loop_ms" in kd:
                            r["overhead_ratio_vs_k_diffusion"] = r["overhead_per_step_us"] / kd["overhead_per_step_us"]
                            r["loop_ratio_vs_k_diffusion"] = r["loop_ms"] / kd["loop_ms"]
                    rows.append(row)
        del unet
    return {"rows": rows}


def _count(name, counted, solver, sigmas, K, x_T, dev, steps, fs):
    """NFE of one implementation, counted by wrapping the model."""
    from bench.loop import diffusers_loop, k_diffusion_loop

    if name.startswith("flowsolve"):
        fs.Sampler(fs.Model(counted, fs.paths.EDM(), predicts="x0"), solver, grid=sigmas.tolist()).sample(x_T, seed=0)
    elif name == "k-diffusion":
        k_diffusion_loop(K, counted, solver, sigmas.to(dev))(x_T)
    else:
        diffusers_loop(counted, solver, steps)(x_T)
    return counted.calls


# ============================================================================================== compile
def compile_section(device, quick: bool = False) -> dict:
    import flowsolve as fs
    from bench.loop import edm_model, gaussian_denoiser, karras_sigmas

    dev = torch.device(device)
    shape = (4, 4, 16, 16) if quick else (64, 4, 64, 64)
    sampler = fs.Sampler(edm_model(gaussian_denoiser), "heun", grid=karras_sigmas(10).tolist())
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * float(sampler.t_max)).to(dev)
    rows = []
    for backend in ("auto", "torch"):
        row = {"solver": "heun", "steps": 10, "shape": list(shape), "backend": backend}
        try:
            run = lambda: sampler.sample(x, seed=0, backend=backend)  # noqa: E731
            eager = run()
            torch._dynamo.reset()
            compiled = torch.compile(run, fullgraph=False, dynamic=False)
            t0 = time.perf_counter()
            out = compiled()
            sync(dev)
            row["first_call_s"] = time.perf_counter() - t0
            row["eager_ms"] = 1e3 * timed(run, dev, repeats=9)
            row["compiled_ms"] = 1e3 * timed(compiled, dev, repeats=9)
            row["speedup"] = row["eager_ms"] / row["compiled_ms"]
            row["max_abs_diff"] = float((out - eager).abs().max())
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
    return {"rows": rows}


# ============================================================================================== report
def environment(device) -> dict:
    import flowsolve as fs

    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "flowsolve": fs.__version__,
           "noise_format": fs.kernels.philox.NOISE_FORMAT_VERSION}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device=p.name, capability=f"sm_{p.major}{p.minor}", memory_GiB=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["device"] = "cpu"
    for mod in ("diffusers", "k_diffusion"):
        try:
            env[mod] = __import__(mod).__version__ if mod != "k_diffusion" else "loaded"
        except Exception:  # noqa: BLE001
            env[mod] = None
    return env


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# flowsolve on a GPU — {env['date']}", "",
             f"{env.get('device')} ({env.get('capability', '')}, {env.get('memory_GiB', '?')} GiB, driver "
             f"{env.get('driver')}), torch {env['torch']} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
             f"diffusers {env.get('diffusers')}, noise format {env['noise_format']}. Command: `python -m bench gpu"
             f"{' --quick' if res.get('quick') else ''}`; sections {', '.join(res['sections'])}; "
             f"{res.get('elapsed_s', 0):.0f} s.", ""]
    k = res.get("kernels")
    if k and "error" not in k:
        bad = [r for part in ("lincomb", "probes", "embedded") for r in k[part] if not r["ok"]]
        lines += ["## Kernels against their twins", "",
                  f"{k['cases']} cases (lincomb over every dtype triple and K, with and without noise, at shapes 1, 7, "
                  f"1023, 4097, [3,5,7], 2^24+3; probes; Hutchinson; embedded step): **{k['cases'] - len(bad)} within "
                  f"their bounds**, worst error/bound {max(r['err_over_bound'] for part in ('lincomb', 'probes', 'embedded') for r in k[part] if 'err_over_bound' in r):.3g}.", ""]
        for r in bad[:20]:
            lines.append(f"- FAIL {r['case']}: {r}")
        nw = k["noise_words"]
        lines += [f"Philox words, GPU kernel vs CPU twin: {sum(c['words'] for c in nw['cases'])} words in "
                  f"{len(nw['cases'])} key/counter cases, bitwise equal: **{nw['ok']}**.", ""]
        lines += ["| keyed normal, GPU vs CPU twin | elements | bitwise equal | 0 ulp | 1 ulp | 2 ulp | >2 ulp |",
                  "|---|---|---|---|---|---|---|"]
        for c in k["noise_floats"]["cases"]:
            h = c["ulps"]
            lines.append(f"| {c['shape']} | {c['elements']} | {c['bitwise_equal']} | {h['0']} | {h['1']} | {h['2']} | {h['>2']} |")
        for name, c in k["box_muller_exhaustive"].items():
            lines.append(f"| Box-Muller, every {name} word ({c['inputs']}), cos lane | {c['inputs']} | {c['bitwise_equal']} "
                         f"| {c['cos_lane']['0']} | {c['cos_lane']['1']} | {c['cos_lane']['2']} | {c['cos_lane']['>2']} |")
        lines.append("")
    elif k:
        lines += ["## Kernels", "", f"error: {k['error'][:1500]}", ""]
    s = res.get("solvers")
    if s and "error" not in s:
        lines += ["## Solvers: CUDA float32 vs CPU float64, same plan and seed", "",
                  "| solver | NFE | relative L2 error | cuda_graph bitwise = eager | ok |", "|---|---|---|---|---|"]
        for r in s["solvers"]:
            if "error" in r:
                lines.append(f"| {r['solver']} | | error: {r['error'][:200]} | | False |")
            else:
                lines.append(f"| {r['solver']} | {r['nfe']} | {r['rel_l2_vs_cpu_float64']:.2e} | "
                             f"{r.get('cuda_graph_bitwise_equal_eager', '—')} | {r['ok']} |")
        lines += ["", f"Hutchinson log-likelihood (heun, 16 steps, 2 probes), CUDA fp32 vs CPU fp64: {s['likelihood']}", ""]
    elif s:
        lines += ["## Solvers", "", f"error: {s['error'][:1500]}", ""]
    b = res.get("bandwidth")
    if b and "error" not in b:
        names = list(b["rows"][0]["cases"])
        lines += ["## Bandwidth (float32, GB/s and fraction of `out.copy_(x)`)", "",
                  "| case | " + " | ".join(f"2^{int(math.log2(r['elements']))}" for r in b["rows"]) + " |",
                  "|---|" + "---|" * len(b["rows"])]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{r['cases'][n]['GB_s']:.0f} ({100 * r['cases'][n]['frac_copy']:.0f}%)"
                                                 for r in b["rows"]) + " |")
        lines.append("")
    elif b:
        lines += ["## Bandwidth", "", f"error: {b['error'][:1500]}", ""]
    lo = res.get("loops")
    if lo and "error" not in lo:
        lines += ["## Whole loops with a small diffusers UNet2DModel", "",
                  "Interleaved rounds, medians. Overhead per step = (loop - the same NFE model calls in a bare Python "
                  "loop) / steps.", "",
                  "| shape | steps | solver | model (ms/NFE) | impl | NFE | loop (ms) | overhead (us/step) | overhead / "
                  "k-diffusion | loop / k-diffusion |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in lo["rows"]:
            for name, i in r["impl"].items():
                if "error" in i:
                    lines.append(f"| {r['shape']} | {r['steps']} | {r['solver']} | | {name} | error: {i['error'][:120]} | | | | |")
                    continue
                lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['steps']} | {r['solver']} | {r['model_ms']:.3f} | "
                             f"{name} | {i['nfe']} | {i['loop_ms']:.2f} | {i['overhead_per_step_us']:.0f} | "
                             f"{i.get('overhead_ratio_vs_k_diffusion', float('nan')):.2f} | "
                             f"{i.get('loop_ratio_vs_k_diffusion', float('nan')):.2f} |")
        lines.append("")
    elif lo:
        lines += ["## Loops", "", f"error: {lo['error'][:1500]}", ""]
    c = res.get("compile")
    if c and "error" not in c:
        lines += ["## torch.compile of Sampler.sample", "", "| backend | shape | first call (s) | eager (ms) | compiled (ms) "
                  "| speedup | max abs diff |", "|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            if "error" in r:
                lines.append(f"| {r['backend']} | {r['shape']} | error: {r['error'][:200]} | | | | |")
            else:
                lines.append(f"| {r['backend']} | {r['shape']} | {r['first_call_s']:.1f} | {r['eager_ms']:.2f} | "
                             f"{r['compiled_ms']:.2f} | {r['speedup']:.2f} | {r['max_abs_diff']:.2g} |")
        lines.append("")
    elif c:
        lines += ["## Compile", "", f"error: {c['error'][:1500]}", ""]
    return "\n".join(lines) + "\n"


FUNCS = {"kernels": kernels_section, "solvers": solvers_section, "bandwidth": bandwidth_section,
         "loops": loops_section, "compile": compile_section}


def run_sections(device, sections, quick: bool, out: str | None) -> dict:
    res = {"environment": environment(device), "sections": list(sections), "quick": quick}
    warm_up(device)
    t0 = time.perf_counter()
    for name in sections:
        t1 = time.perf_counter()
        print(f"[bench gpu] {name} ...", flush=True)
        try:
            res[name] = FUNCS[name](device, quick)
        except Exception as e:  # noqa: BLE001 - a failing section is reported, the others still run
            res[name] = {"error": "".join(traceback.format_exception(e))[-3000:]}
        res[name]["seconds"] = time.perf_counter() - t1
        res["elapsed_s"] = time.perf_counter() - t0
        print(f"[bench gpu] {name} done in {res[name]['seconds']:.1f} s", flush=True)
        if out:
            write(out, res)
    return res


def write(out: str, res: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(out, "gpu.md"), "w") as f:
        f.write(markdown(res))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    args = p.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        p.error(f"--only: choose from {', '.join(SECTIONS)}; got {args.only!r}")
    if not torch.cuda.is_available():
        print("python -m bench gpu needs a CUDA device (torch.cuda.is_available() is False): run it on a machine with an "
              "NVIDIA GPU and the CUDA build of torch. Without a GPU, `python -m bench kernels` compiles every kernel "
              "for sm_80/90/100 and `python -m pytest tests` checks the kernels against their twins through Triton's "
              "interpreter.", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    res = run_sections("cuda", sections, args.quick, args.out)
    print(markdown(res))
    ok = all(res[s].get("ok", True) and "error" not in res[s] for s in sections)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
