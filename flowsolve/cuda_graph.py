"""CUDA-graph sampling: capture a planned sampler's whole loop once, replay it per batch.

A fixed-step sampler is a fixed sequence of kernel launches: the plan's coefficient tables, the
evaluation times and the step index all live in device memory, the loop never reads device memory
from the host (tests/test_no_host_sync.py), and the keyed noise reads its seed from a one-element
device tensor. So the whole loop -- initial noise, every model call, every fused update, the step
index increments -- can be recorded once with ``torch.cuda.graph`` and replayed with one launch per
batch (NVIDIA, "CUDA Graphs", CUDA C Programming Guide §3.2.8.10; PyTorch ``torch.cuda.CUDAGraph``).

What is static (fixed at capture): the batch shape, dtype and device, the model (its weights may
change in place), ``sample_offset`` and the plan. What changes per replay: the seed (copied into the
captured seed tensor) and, optionally, the initial state (copied into the captured input buffer).
The reset of the step index is itself a captured kernel, so each replay starts at step 0.

The model must be capturable (no host syncs, no data-dependent shapes, no CPU tensors created per
call); ``check_finite`` (a host sync per evaluation) and adaptive solvers (one host decision per
step) cannot be captured and are refused.

The capture mechanism is injected (``capture=``) so that everything but the CUDA call itself is
unit-tested on CPU: ``EagerReplay`` re-runs the recorded loop, which must then give the same samples
as ``Sampler.sample`` for every seed and input, through the same static buffers.
"""
from __future__ import annotations

import torch

from .kernels import STREAM_INIT, normal_, resolve_backend
from .kernels.seed import resolve_seed, seed_tensor, seed_value
from .sample import Run, Sampler

__all__ = ["GraphedSampler", "CUDAGraphCapture", "EagerReplay"]


class CUDAGraphCapture:
    """Record ``fn`` into a ``torch.cuda.CUDAGraph`` after ``warmup`` eager runs on a side stream
    (PyTorch's recipe: warm-up lets lazy initialisation, allocator pools and autotuning happen
    outside the capture)."""

    def __init__(self, warmup: int = 2):
        self.warmup = int(warmup)
        self.graph = None

    def record(self, fn) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerReplay:
    """A stand-in for ``CUDAGraphCapture`` on any device: ``replay`` runs the recorded function again.

    It checks the graph path's logic (static buffers, seed and input copied in before a replay,
    the step index reset inside the recorded region) without a GPU; it gives no speed-up."""

    def __init__(self):
        self.fn = None
        self.recorded = 0

    def record(self, fn) -> None:
        self.fn = fn
        fn()  # the warm-up run, as CUDAGraphCapture makes
        self.recorded += 1

    def replay(self) -> None:
        self.fn()


class GraphedSampler:
    """A ``fs.Sampler`` whose loop is captured once for one batch shape and replayed per call.

    Args:
        sampler: a planned fixed-step ``fs.Sampler``.
        shape: the batch shape ``(B, ...)`` of every call.
        dtype: state dtype (float32 or float64).
        device: a CUDA device for ``CUDAGraphCapture`` (the default capture on CUDA devices).
        backend: kernel backend ("auto" takes the Triton kernels on CUDA).
        sample_offset: global index of the first sample (fixed at capture).
        capture: the capture mechanism, a class (one instance per recorded graph: one for keyed
            initial noise, one for a given initial state); default ``CUDAGraphCapture`` on CUDA, and
            an error elsewhere unless ``EagerReplay`` is passed explicitly.

    ``graphed.sample(seed=s)`` equals ``sampler.sample(shape, seed=s)``; ``graphed.sample(x, seed=s)``
    equals ``sampler.sample(x, seed=s)``. The returned tensor is a fresh copy (the static output buffer
    is overwritten by the next replay).
    """

    def __init__(self, sampler: Sampler, shape, *, dtype=torch.float32, device="cuda", backend=None,
                 sample_offset: int = 0, capture=None):
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a fs.Sampler; got {type(sampler).__name__}.")
        if sampler.plan is None:
            raise ValueError(
                f"solver {sampler.solver.info.name!r} is adaptive: its step sizes are host decisions made after each "
                "step, which a CUDA graph cannot record. Use a fixed-step solver (e.g. 'dpm++3m', 'rk4')."
            )
        if sampler.model.check_finite:
            raise ValueError("check_finite=True syncs with the host after every model call and cannot be captured; "
                             "build the fs.Model with check_finite=False for CUDA-graph sampling.")
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError as e:
            raise TypeError(f"shape must be a batch-first sequence of ints like (16, 3, 64, 64); got {shape!r}.") from e
        if len(shape) == 0 or any(s <= 0 for s in shape):
            raise ValueError(f"shape={shape} must be batch-first with positive sizes.")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype={dtype}: the solver state must be torch.float32 or torch.float64.")
        if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
            raise ValueError(f"sample_offset={sample_offset!r} must be a non-negative int.")
        device = torch.device(device)
        if capture is None:
            if device.type != "cuda":
                raise ValueError(
                    f"device={device}: CUDA graphs need a CUDA device. Pass device='cuda' (or "
                    "capture=flowsolve.cuda_graph.EagerReplay to run the same code path without a graph)."
                )
            capture = CUDAGraphCapture
        if not callable(capture):
            raise TypeError("capture must be a class such as flowsolve.cuda_graph.EagerReplay (one instance is made "
                            f"per recorded graph); got {type(capture).__name__}.")
        self.sampler, self.shape, self.dtype, self.device = sampler, shape, dtype, device
        self.backend = resolve_backend(backend, device)
        self.sample_offset = sample_offset
        self._seed = seed_tensor(0, device)                        # copied into before each replay
        self._x_in = torch.zeros(shape, dtype=dtype, device=device)  # the given initial state, copied in
        self._x = torch.empty(shape, dtype=dtype, device=device)     # the live state and the output
        self._zero = torch.zeros(1, dtype=torch.int64, device=device)
        # the device step index, always: a recorded graph replays the same kernels, so nothing may be read on
        # the host by the Python step number (the CPU host-coefficient path of Run is off here)
        self._run = Run(sampler.model, sampler.plan, self._x, self._seed, self.backend, sample_offset, False,
                        host_coefficients=False)
        self._capture = capture
        self._graphs = {}  # "noise" | "input" -> a recorded capture, made on first use
        self.replays = 0

    def _loop(self, from_input: bool) -> None:
        """The recorded region: the initial state (the input buffer, or keyed prior noise on stream 1
        exactly as ``Sampler.sample`` draws it), then every step of the plan. It reads only the static
        tensors above; ``from_input`` is fixed per recorded graph."""
        run, sampler = self._run, self.sampler
        if from_input:
            self._x.copy_(self._x_in)
        else:
            normal_(self._x, self._seed, self._zero, sample_offset=self.sample_offset, stream=STREAM_INIT,
                    backend=self.backend)
            self._x.mul_(sampler.prior_std)
        run.step_index.zero_()
        run._n = 0
        for n in range(sampler.plan.n_steps):
            sampler.solver.step(run, n)
            run.advance()

    def _graph(self, mode: str):
        if mode not in self._graphs:
            capture = self._capture()
            capture.record(lambda: self._loop(mode == "input"))
            self._graphs[mode] = capture
        return self._graphs[mode]

    @torch.no_grad()
    def sample(self, noise=None, *, seed=None, return_info: bool = False):
        """Replay the captured loop for ``seed``, from ``noise`` (a tensor of the captured shape: x(t_max) as in
        ``fs.sample``) or from keyed prior noise when ``noise`` is None. The first call of each kind records its
        graph. Returns x(t_min) as a new tensor [, info: ``seed``, ``nfe``].

        ``seed`` as in ``fs.sample``: an int (numpy integers too), a one-element integer tensor, a
        torch.Generator (the same 64-bit key ``fs.sample`` derives from it) or None (the default: a fresh key
        from torch's global CPU generator, ``info["seed"]``)."""
        if not isinstance(return_info, bool):
            raise TypeError(f"return_info={return_info!r} must be True or False.")
        if noise is not None:
            if not isinstance(noise, torch.Tensor):
                raise TypeError(f"noise must be a tensor shaped {self.shape} or None; got {type(noise).__name__}.")
            if tuple(noise.shape) != self.shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)} but the graph was captured for {self.shape}; "
                                 "build another GraphedSampler for this shape.")
        # after the checks (a refused call draws nothing); as fs.sample, seed=None draws no key for a run without
        # noise (a deterministic solver from a given state; info["seed"] is then None)
        draws = noise is None or self.sampler.solver.info.stochastic
        seed = None if (seed is None and not draws) else resolve_seed(seed)
        self._seed.copy_(seed_tensor(0 if seed is None else seed, self.device))
        if noise is not None:
            self._x_in.copy_(noise)
        self._graph("noise" if noise is None else "input").replay()  # recording executes nothing that counts
        self.replays += 1
        if return_info:
            return self._x.clone(), {"seed": None if seed is None else seed_value(seed), "nfe": self.nfe}
        return self._x.clone()

    @property
    def nfe(self) -> int:
        return self.sampler.nfe
