"""What a new user meets first: the command line, the compile notice, the installed layout."""
import os
import subprocess
import sys

import pytest

import fastattn
from fastattn.__main__ import COMMANDS, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_prints_the_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastattn {fastattn.__version__}"


def test_unknown_command_names_the_known_ones(capsys):
    assert main(["demoo"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'demoo'" in err
    for name in COMMANDS:
        assert name in err


def test_demo_plot_without_a_file_writes_the_default_file(tmp_path, monkeypatch, capsys):
    from fastattn import demo
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--no-timing", "--plot"]) == 0
    with open(tmp_path / demo.PLOT_FILE, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert demo.PLOT_FILE in capsys.readouterr().out


def test_demo_figure_keeps_its_title_and_labels_inside():
    import matplotlib
    from fastattn import demo
    fig = demo.figure()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text() and t.get_visible()]
    assert any("Attention moves apple" in t.get_text() for t in texts)
    for t in texts:
        box = t.get_window_extent(renderer)
        assert (box.x0 >= fig.bbox.x0 and box.x1 <= fig.bbox.x1 and box.y0 >= fig.bbox.y0
                and box.y1 <= fig.bbox.y1), f"{t.get_text()!r} sticks out of the figure"


@pytest.mark.parametrize("installed, driver, expected", [
    (False, False, "numba-cuda is not installed (pip install 'fastattn[cuda]')"),
    (True, False, "no NVIDIA driver was found"),
    (True, True, "the driver sees no GPU"),
])
def test_info_says_exactly_what_is_missing_for_the_gpu(monkeypatch, installed, driver, expected):
    from numba import cuda
    from fastattn import _backends
    monkeypatch.setattr(_backends, "_numba_cuda_installed", lambda: installed)
    monkeypatch.setattr(_backends, "_cuda_driver_loads", lambda: driver)
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    _backends.cuda_unavailable_reason.cache_clear()
    try:
        reason = _backends.cuda_unavailable_reason()
    finally:
        _backends.cuda_unavailable_reason.cache_clear()
    assert expected in reason
    if installed:
        assert "pip install" not in reason  # never tell a user to install what they have


def _run(code: str, env: dict, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_compile_notice_appears_once_with_a_cold_cache_and_not_with_a_warm_one(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    code = ("import numpy as np, fastattn\n"
            "x = np.arange(12, dtype=np.float32).reshape(3, 4)\n"
            "for _ in range(2): fastattn.softmax(x, backend='numba')\n")
    cold = _run(code, env, str(tmp_path))
    assert cold.returncode == 0, cold.stderr
    assert cold.stderr.count("fastattn: compiling the CPU kernel 'softmax' for float32") == 1
    warm = _run(code, env, str(tmp_path))
    assert warm.returncode == 0, warm.stderr
    assert "fastattn: compiling" not in warm.stderr


def test_a_non_editable_install_imports_every_subpackage_outside_the_repository(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), REPO], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    assert not (target / "kernels").exists()  # nothing named `kernels` at the top level
    env = dict(os.environ, PYTHONPATH=str(target))
    code = ("import fastattn, fastattn.bench, fastattn.kernels.cpu, fastattn.kernels.cuda\n"
            "print(fastattn.__file__); print(fastattn.kernels.cpu.__file__)\n")
    run = _run(code, env, str(tmp_path))
    assert run.returncode == 0, run.stderr
    for line in run.stdout.split():
        assert line.startswith(str(target)), run.stdout
