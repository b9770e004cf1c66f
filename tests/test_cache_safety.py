"""Cache safety: the bench reference cache (bench/problems.py) and the grid cache of fs.grids.optimize.

A cache may only ever return what a fresh computation would: every test compares the answer after a
tampered, truncated, mismatched or unwritable cache with the answer computed without the cache. Files are
written by rename only (temp file in the same folder + os.replace), a tampered pickle never runs code, and
the grid cache key tells apart models that differ in anything that changes their function (activation,
plain attributes, non-persistent buffers, hooks, training mode, forward code under the same class name).
"""
import os
import re
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


@pytest.mark.parametrize("tamper", [_truncated, _garbage_table, _not_a_dict, _wrong_dtype, _non_finite,
                                    _bad_error_field, _computed_for_another_start])
def test_bench_cache_bad_file_is_recomputed_with_a_warning(tmp_path, monkeypatch, one_thread, tamper):
    p, x_T = _mixture(tmp_path, monkeypatch)
    fresh = p.reference(x_T, p.t_max, tol=1e-8)
    path = _only_file(tmp_path)
    saved = torch.load(path, weights_only=True)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    monkeypatch.setenv("FLOWSOLVE_BENCH_CACHE", str(other_dir))
    p.reference(x_T + 1e-3, p.t_max, tol=1e-8)
    other = _only_file(other_dir)
    monkeypatch.setenv("FLOWSOLVE_BENCH_CACHE", str(tmp_path))
    tamper(path, saved, other)
    hits = p.cache_hits
    with pytest.warns(UserWarning, match=re.escape(path)):
        again = p.reference(x_T, p.t_max, tol=1e-8)
    assert torch.equal(again, fresh) and p.cache_hits == hits
    # the bad file was replaced by a good one: the next call is a silent hit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = p.reference(x_T, p.t_max, tol=1e-8)
    assert torch.equal(third, fresh) and p.cache_hits == hits + 1


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
