"""Cache safety: the bench reference cache (bench/problems.py) and the grid cache of fs.grids.optimize.

A cache may only ever return what a fresh computation would: every test compares the answer after a
tampered, truncated, mismatched or unwritable cache with the answer computed without the cache. Files are
written by rename only (temp file in the same folder + os.replace), a tampered pickle never runs code, and
the grid cache key tells apart models that differ in anything that changes their function (activation,
plain attributes, non-persistent buffers, hooks, training mode, forward code under the same class name).
"""
import copy
import json
import os
import re
import shutil
import warnings

import pytest
import torch

import flowsolve as fs
from bench.problems import problems

# the cheap grid examples use a coarse pilot reference on purpose: its warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:the pilot reference's estimated error")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ================================================================================================
# bench reference cache
# ================================================================================================
def _mixture(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSOLVE_BENCH_CACHE", str(tmp_path))
    p = problems()["mixture-rf"]
    x_T = p.prob.sample(2, p.t_max, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return p, x_T


def _only_file(folder):
    files = sorted(os.listdir(folder))
    assert len(files) == 1, files
    return os.path.join(folder, files[0])


class _RunsCode:
    """Unpickling this calls open(marker, "w"): the file appears only if the loader executes pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bench_cache_tampered_pickle_runs_no_code(tmp_path, monkeypatch, one_thread):
    """A cache file replaced by a pickle that runs code on load: not executed even where torch.load would
    unpickle by default (torch < 2.6, simulated by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, which only overrides a call
    that does not pass weights_only); the file is named in a warning and the reference recomputed."""
    cache = tmp_path / "cache"
    p, x_T = _mixture(cache, monkeypatch)
    fresh = p.reference(x_T, p.t_max, tol=1e-8)
    path = _only_file(cache)
    marker = tmp_path / "code-ran"
    torch.save({"ref": _RunsCode(str(marker))}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(UserWarning, match=re.escape(path)):
        again = p.reference(x_T, p.t_max, tol=1e-8)
    assert not marker.exists()
    assert torch.equal(again, fresh)


def _truncated(path, saved, other):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _garbage_table(path, saved, other):
    torch.save({"ref": torch.zeros(3, 3, dtype=torch.float64), "error": 0.0, "steps": 256}, path)


def _not_a_dict(path, saved, other):
    torch.save(torch.zeros(2, 2, dtype=torch.float64), path)


def _wrong_dtype(path, saved, other):
    torch.save(dict(saved, ref=saved["ref"].float()), path)


def _non_finite(path, saved, other):
    ref = saved["ref"].clone()
    ref[0, 0] = float("nan")
    torch.save(dict(saved, ref=ref), path)


def _bad_error_field(path, saved, other):
    torch.save(dict(saved, error="small"), path)


def _computed_for_another_start(path, saved, other):
    """A well-formed file of the same shape and dtype, computed for another x_T (a copied or renamed file)."""
    os.replace(other, path)


@pytest.fixture(scope="module")
def two_cache_files(tmp_path_factory):
    """(reference for x_T, cache file for x_T, cache file for x_T + 1e-3), computed once for the tamper cases."""
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only slows them down on a loaded machine
    with pytest.MonkeyPatch.context() as mp:
        for name, shift in (("mine", 0.0), ("other", 1e-3)):
            folder = tmp_path_factory.mktemp(name)
            p, x_T = _mixture(folder, mp)
            out[name] = (p.reference(x_T + shift, p.t_max, tol=1e-8), _only_file(folder))
    torch.set_num_threads(threads)
    return out["mine"][0], out["mine"][1], out["other"][1]


@pytest.mark.parametrize("tamper", [_truncated, _garbage_table, _not_a_dict, _wrong_dtype, _non_finite,
                                    _bad_error_field, _computed_for_another_start])
def test_bench_cache_bad_file_is_recomputed_with_a_warning(tmp_path, monkeypatch, one_thread, two_cache_files,
                                                           tamper):
    fresh, mine, other = two_cache_files
    p, x_T = _mixture(tmp_path, monkeypatch)
    path = str(tmp_path / os.path.basename(mine))
    shutil.copyfile(mine, path)
    saved = torch.load(path, weights_only=True)
    other_copy = str(tmp_path.parent / f"other-{tamper.__name__}.pt")
    shutil.copyfile(other, other_copy)
    tamper(path, saved, other_copy)
    hits = p.cache_hits
    with pytest.warns(UserWarning, match=re.escape(path)):
        again = p.reference(x_T, p.t_max, tol=1e-8)
    assert torch.equal(again, fresh) and p.cache_hits == hits
    # the bad file was replaced by a good one: the next call is a silent hit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = p.reference(x_T, p.t_max, tol=1e-8)
    assert torch.equal(third, fresh) and p.cache_hits == hits + 1 and os.listdir(tmp_path) == [os.path.basename(path)]


def test_bench_cache_write_is_atomic(tmp_path, monkeypatch, one_thread):
    """A write that fails before its rename (os.replace raising, as on a full disk) leaves no file behind, not
    even a temp file, says so, and still returns the reference."""
    p, x_T = _mixture(tmp_path, monkeypatch)

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.warns(UserWarning, match="cache"):
        ref = p.reference(x_T, p.t_max, tol=1e-8)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert torch.equal(ref, p.reference(x_T, p.t_max, tol=1e-8, cache=False))


# ================================================================================================
# grid cache: what the key covers
# ================================================================================================
KW = dict(nfe=4, solver="dpm++2m", pilot=4, shape=(2,), max_iter=3, ref_steps=8, return_info=True)


class _HalfInTraining(torch.nn.Module):
    """Halves its input in training mode (as dropout-like layers change a network's function with .train())."""

    def forward(self, x):
        return 0.5 * x if self.training else x


class _Net(torch.nn.Module):
    """A small MLP eps model on (x, t); ``scale`` is a plain attribute that multiplies the output."""

    def __init__(self, act=None, scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(3, 8), act or torch.nn.Tanh(), torch.nn.Linear(8, 2))
        self.norm = _HalfInTraining()
        self.scale = scale
        self.register_buffer("shift", torch.zeros(2), persistent=False)
        self.double()

    def forward(self, x, t):
        return self.norm(self.body(torch.cat([x, t[:, None]], 1))) * self.scale + self.shift


def _same_qualname_other_code():
    """Two classes named ``user_models.Net`` whose forward differs (a class edited between two sessions)."""
    src = ("class Net(torch.nn.Module):\n"
           "    def __init__(self):\n"
           "        super().__init__()\n"
           "        torch.manual_seed(0)\n"
           "        self.lin = torch.nn.Linear(3, 2).double()\n"
           "    def forward(self, x, t):\n"
           "        return torch.{}(self.lin(torch.cat([x, t[:, None]], 1)))\n")
    nets = []
    for fn in ("tanh", "sin"):
        ns = {"__name__": "user_models", "torch": torch}
        exec(src.format(fn), ns)
        nets.append(ns["Net"]())
    return nets


def _with_hook():
    a = _Net()
    b = copy.deepcopy(a)
    b.register_forward_hook(lambda module, args, out: 0.5 * out)
    return a, b


def _non_persistent_buffer():
    a, b = _Net(), _Net()
    b.shift.fill_(0.25)
    return a, b


PAIRS = {
    "relu-vs-tanh": lambda: (_Net(torch.nn.Tanh()), _Net(torch.nn.ReLU())),
    "plain-attribute": lambda: (_Net(scale=1.0), _Net(scale=0.5)),
    "non-persistent-buffer": _non_persistent_buffer,
    "forward-hook": _with_hook,
    "eval-vs-train": lambda: (_Net().eval(), _Net().train()),
    "same-qualname-other-forward": _same_qualname_other_code,
}


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_models_that_compute_different_functions_do_not_share_a_grid(tmp_path, pair):
    """Equal state_dicts, different functions: each model gets its own grid (the one a fresh, uncached run
    gives), in memory and on disk."""
    a, b = PAIRS[pair]()
    assert set(a.state_dict()) == set(b.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    path = fs.paths.VP()
    ma, mb = fs.Model(a, path, predicts="eps"), fs.Model(b, path, predicts="eps")
    fs.grids.clear_cache()
    grid_a, info_a = fs.grids.optimize(ma, cache_dir=tmp_path, **KW)
    grid_b, info_b = fs.grids.optimize(mb, cache_dir=tmp_path, **KW)
    assert not info_a["cache_hit"] and not info_b["cache_hit"]
    assert torch.equal(grid_b, fs.grids.optimize(mb, cache=False, **KW)[0])
    fs.grids.clear_cache()  # a later session: each is answered from its own file
    for model, grid in ((mb, grid_b), (ma, grid_a)):
        again, info = fs.grids.optimize(model, cache_dir=tmp_path, **KW)
        assert info["cache_hit"] and torch.equal(again, grid)


def test_an_equal_copy_of_a_module_shares_its_grid(tmp_path):
    """The other side of the key: a deep copy (same classes, code, weights, buffers, attributes, hooks) is
    answered from the cache, in memory and from disk."""
    _, a = _with_hook()  # with a forward hook
    path = fs.paths.VP()
    fs.grids.clear_cache()
    grid, info = fs.grids.optimize(fs.Model(a, path, predicts="eps"), cache_dir=tmp_path, **KW)
    assert not info["cache_hit"]
    b = copy.deepcopy(a)
    for second_session in (False, True):
        if second_session:
            fs.grids.clear_cache()
        again, info = fs.grids.optimize(fs.Model(b, path, predicts="eps"), cache_dir=tmp_path, **KW)
        assert info["cache_hit"] and torch.equal(again, grid)


def test_plain_callable_is_keyed_by_identity_unless_given_a_cache_key(tmp_path):
    """Two equal lambdas: by identity they do not share a grid and cache_dir is not used (with a warning
    that says how to enable it); with the same cache_key they share it, also on disk; another key misses."""
    path = fs.paths.VP()
    prob = fs.analytic.Gaussian(torch.tensor([0.5, -1.0], dtype=torch.float64),
                                torch.tensor([0.3, 0.8], dtype=torch.float64), path)
    fn_a = lambda x, t: prob.eps(x, t)  # noqa: E731
    fn_b = lambda x, t: prob.eps(x, t)  # noqa: E731
    fs.grids.clear_cache()
    with pytest.warns(UserWarning, match="cache_key"):
        fs.grids.optimize(fs.Model(fn_a, path, predicts="eps"), cache_dir=tmp_path, **KW)
    assert os.listdir(tmp_path) == []
    grid, info = fs.grids.optimize(fs.Model(fn_a, path, predicts="eps"), cache_key="gauss-v1", cache_dir=tmp_path, **KW)
    assert not info["cache_hit"] and len(os.listdir(tmp_path)) == 1
    fs.grids.clear_cache()
    again, info = fs.grids.optimize(fs.Model(fn_b, path, predicts="eps"), cache_key="gauss-v1", cache_dir=tmp_path, **KW)
    assert info["cache_hit"] and torch.equal(again, grid)
    _, info = fs.grids.optimize(fs.Model(fn_b, path, predicts="eps"), cache_key="gauss-v2", cache_dir=tmp_path, **KW)
    assert not info["cache_hit"]
    with pytest.raises(TypeError, match="cache_key"):
        fs.grids.optimize(fs.Model(fn_b, path, predicts="eps"), cache_key=3, **KW)


# ================================================================================================
# grid cache: the disk file
# ================================================================================================
def _gauss_model():
    path = fs.paths.VP()
    prob = fs.analytic.Gaussian(torch.tensor([0.5, -1.0], dtype=torch.float64),
                                torch.tensor([0.3, 0.8], dtype=torch.float64), path)
    return fs.Model(prob.eps, path, predicts="eps")


def _edit(field, value):
    def tamper(path):
        stored = json.load(open(path))
        stored[field] = value(stored[field]) if callable(value) else value
        json.dump(stored, open(path, "w"))
    return tamper


def _raw(data):
    def tamper(path):
        open(path, "wb").write(data(open(path, "rb").read()))
    return tamper


GRID_TAMPERS = {
    "truncated": _raw(lambda b: b[: len(b) // 2]),
    "binary-garbage": _raw(lambda b: bytes(range(256))),
    "empty": _raw(lambda b: b""),
    "json-list": _raw(lambda b: b"[1, 2, 3]"),
    "grid-not-a-list": _edit("grid", "0.5"),
    "grid-with-strings": _edit("grid", lambda g: [str(v) for v in g]),
    "grid-not-finite": _edit("grid", lambda g: [g[0], float("nan")] + g[2:]),
    "grid-not-monotone": _edit("grid", lambda g: [g[0], g[2], g[1]] + g[3:]),
    "grid-wrong-length": _edit("grid", lambda g: g[:1] + g[2:]),
    "grid-outside-range": _edit("grid", lambda g: [g[0] + 0.5] + g[1:]),
    "info-not-a-dict": _edit("info", [1]),
    "another-key": _edit("key", "('hash', 'something else')"),
}


@pytest.mark.parametrize("tamper", sorted(GRID_TAMPERS))
def test_bad_grid_file_is_a_miss_with_a_warning(tmp_path, tamper):
    """Truncated, non-JSON, wrong-typed, invalid (non-finite, non-monotone, wrong length, out of range) or
    mismatched files: a warning naming the file, then the grid a fresh run gives, and the file is rewritten."""
    model = _gauss_model()
    fs.grids.clear_cache()
    fresh, _ = fs.grids.optimize(model, cache_dir=tmp_path, **KW)
    (name,) = os.listdir(tmp_path)
    path = os.path.join(tmp_path, name)
    GRID_TAMPERS[tamper](path)
    fs.grids.clear_cache()
    with pytest.warns(UserWarning, match=re.escape(path)):
        grid, info = fs.grids.optimize(model, cache_dir=tmp_path, **KW)
    assert not info["cache_hit"] and torch.equal(grid, fresh)
    fs.grids.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grid, info = fs.grids.optimize(model, cache_dir=tmp_path, **KW)
    assert info["cache_hit"] and torch.equal(grid, fresh)


def test_grid_file_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way (the disk fills during json.dump) leaves neither a partial file nor a temp
    file, warns, and the grid is still returned; later calls are not broken by it."""
    model = _gauss_model()
    real_dump = json.dump

    def half_then_fail(obj, fh, **kw):
        fh.write(json.dumps(obj)[:20])
        raise OSError(28, "No space left on device")

    fs.grids.clear_cache()
    expected, _ = fs.grids.optimize(model, cache=False, **KW)
    monkeypatch.setattr(json, "dump", half_then_fail)
    with pytest.warns(UserWarning, match="cache_dir"):
        grid, _ = fs.grids.optimize(model, cache_dir=tmp_path, **KW)
    assert torch.equal(grid, expected) and os.listdir(tmp_path) == []
    monkeypatch.setattr(json, "dump", real_dump)
    fs.grids.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", "the pilot reference's estimated error")
        grid, info = fs.grids.optimize(model, cache_dir=tmp_path, **KW)
    assert not info["cache_hit"] and torch.equal(grid, expected) and len(os.listdir(tmp_path)) == 1


class _Raises(torch.nn.Module):
    def forward(self, x, t):
        raise RuntimeError("the model was called")


def test_unwritable_cache_dir_warns_before_the_optimization_and_still_returns_the_grid(tmp_path):
    """cache_dir under a regular file cannot be created (also for root, whom permission bits do not stop). The
    warning comes before the first model call (a model that raises shows the order), and the grid comes back."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad_dir = blocker / "grids"
    path = fs.paths.VP()
    fs.grids.clear_cache()
    with pytest.warns(UserWarning, match=re.escape(f"cache_dir={str(bad_dir)!r}")):
        with pytest.raises(RuntimeError, match="the model was called"):
            fs.grids.optimize(fs.Model(_Raises(), path, predicts="eps"), cache_dir=bad_dir, **KW)
    model = _gauss_model()
    expected, _ = fs.grids.optimize(model, cache=False, **KW)
    for cache_dir in (bad_dir, blocker):
        fs.grids.clear_cache()
        with pytest.warns(UserWarning, match="not writable"):
            grid, info = fs.grids.optimize(model, cache_dir=cache_dir, **KW)
        assert torch.equal(grid, expected) and not info["cache_hit"]
    assert blocker.read_text() == ""
