"""The package resolves the same way from any directory: the checkout's root, elsewhere, a wheel."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from moeplace.client import free_port, running_server

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.mark.parametrize("cwd", [REPO, REPO / "tests"], ids=["root", "tests"])
def test_cli_and_runtime_import_from_the_checkout(cwd):
    # `python -m` puts the current directory first on sys.path: a root folder named `moeplace` would win.
    result = _run([sys.executable, "-m", "moeplace.cli", "--help"], cwd)
    assert result.returncode == 0, result.stderr
    assert "solve" in result.stdout
    result = _run([sys.executable, "-c", "import moeplace.runtime.launch, moeplace.placer.solve, moeplace.resources as r;"
                   "print(r.EXAMPLE_TRACE.is_file())"], cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_no_root_folder_shadows_the_package():
    assert not (REPO / "moeplace").exists(), "a root folder named moeplace shadows the installed package"


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A fresh virtual environment with moeplace installed from a wheel built from the tree. It reuses
    the current environment's dependencies through a path entry, which does not run that environment's
    .pth files: the editable install stays invisible."""
    root = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(root / "dist"), str(REPO)], root)
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("moeplace-*.whl")
    venv = root / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root).returncode == 0
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                      "--no-deps", "--no-index", str(wheel)], root)
    assert installed.returncode == 0, installed.stderr
    return venv


@pytest.mark.slow
def test_wheel_runs_the_offline_demo_outside_the_checkout(wheel_env, tmp_path):
    probe = _run([str(wheel_env / "bin" / "python"), "-c", "import moeplace; print(moeplace.__file__)"], tmp_path)
    assert str(wheel_env) in probe.stdout, probe.stdout + probe.stderr
    result = _run([str(wheel_env / "bin" / "moeplace"), "demo", "--offline", "--time-limit", "2"], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "held-out" in result.stdout


@pytest.mark.slow
def test_wheel_serves_the_embedded_model_outside_the_checkout(wheel_env, tmp_path):
    port = free_port()
    cmd = [str(wheel_env / "bin" / "moeplace"), "serve", "--nproc", "1", "--port", str(port)]
    env = {"PATH": f"{wheel_env / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "MOEPLACE_CACHE": str(tmp_path / "cache")}
    with running_server(cmd, env, tmp_path / "serve.log", port) as (url, _):
        import httpx

        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert answer.status_code == 200, answer.text
    assert str(REPO) not in (tmp_path / "serve.log").read_text()
