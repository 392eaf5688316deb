"""`pip install .` with pip's default build isolation stops at once and says to build against
the installed torch with --no-build-isolation (a real isolated pip run is too slow and needs the
package index; this hides torch from setup.py the way an isolated environment does)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HIDE_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
              "runpy.run_path('setup.py', run_name='__main__')")


def test_setup_without_importable_torch_stops_with_the_fix():
    import torch
    done = subprocess.run([sys.executable, "-c", HIDE_TORCH], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert f"torch {torch.__version__} is installed" in done.stderr
    assert "isolated environment" in done.stderr
    assert "pip install --no-build-isolation ." in done.stderr
    assert "Traceback" not in done.stderr


def test_pyproject_does_not_declare_torch_as_a_build_requirement():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        build = tomllib.load(f)["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert not any(r.split("[")[0].split("=")[0].split(">")[0].strip() == "torch"
                   for r in build["requires"])
