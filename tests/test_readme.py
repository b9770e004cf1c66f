"""The README's quick start runs, and its two commands are the ones CI uses."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_start_runs_and_prints_what_it_says(capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    info, x = namespace["info"], namespace["x"]
    assert info["nfe"] == 20
    assert x.shape == (16, 2)
    out = capsys.readouterr().out
    assert "['bosh3', 'dopri5', 'ggf', 'tsit5']" in out
    info_a = namespace["info_a"]
    assert info_a["nfe"] > 0 and info_a["steps"] > 0 and f"{info_a['nfe']} {info_a['steps']}" in out


def test_ci_runs_the_readme_test_command():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    assert "torch==2.13.0" in commands[0] and "python -m bench steps" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_plug_in_your_model_runs():
    import pytest

    pytest.importorskip("diffusers")
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Plug in your model\s+```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "README plug in your model", "exec"), namespace)
    assert namespace["x"].shape == (16, 2) and bool(namespace["x"].isfinite().all())
    assert len(namespace["seen"]) == 8
    grid = namespace["grid"]
    assert bool((grid[1:] < grid[:-1]).all())
