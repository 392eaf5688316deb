"""The CMake-built library (for libtorch users) registers the same ops. `bash bench/build_cmake.sh
build/cmake` builds it (the README's set-up does); PEDRO_EXT_CMAKE_LIB may point elsewhere. The
check runs in a fresh process that never imports pedro_ext._C."""
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.environ.get("PEDRO_EXT_CMAKE_LIB") or os.path.join(ROOT, "build", "cmake",
                                                            "libpedro_ext_ops.so")

SCRIPT = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from helpers import make_bank, bank_args
import importlib.util
spec = importlib.util.spec_from_file_location("ref", sys.argv[3])
ref = importlib.util.module_from_spec(spec); spec.loader.exec_module(ref)
bank = make_bank(5, 9, 3, 17, dtype=torch.float64)
pooled = torch.randn(6, 9, dtype=torch.float64)
ids = torch.tensor([0, 4, -1, 4, 2, 1])
v = torch.ops.pedro_ext.generate(pooled, ids, *bank_args(bank))
assert torch.allclose(v, ref.generate(pooled, ids, *bank_args(bank)), atol=1e-12)
x = torch.randn(6, 3, 17, dtype=torch.float64)
assert torch.equal(torch.ops.pedro_ext.modulate(x, v, None), x * v[:, None])
assert "pedro_ext._C" not in sys.modules
print("ok")
"""


def test_cmake_library_registers_the_ops():
    assert os.path.isfile(LIB), (f"no CMake-built library at {LIB}: run `bash bench/build_cmake.sh "
                                 "build/cmake` (or set PEDRO_EXT_CMAKE_LIB)")
    here = os.path.dirname(os.path.abspath(__file__))
    root = ROOT
    # helpers imports pedro_ext.activations (pure Python, with .reference); the package __init__ would load _C,
    # so give the child a stub package that holds only that module.
    stub = os.path.join(os.environ.get("TMPDIR", "/tmp"), "pedro_stub")
    os.makedirs(os.path.join(stub, "pedro_ext"), exist_ok=True)
    open(os.path.join(stub, "pedro_ext", "__init__.py"), "w").close()
    for name in ("activations.py", "reference.py"):
        with open(os.path.join(root, "pedro_ext", name)) as src, \
                open(os.path.join(stub, "pedro_ext", name), "w") as dst:
            dst.write(src.read())
    env = dict(os.environ, PYTHONPATH=stub)
    out = subprocess.run([sys.executable, "-c", SCRIPT, LIB, here,
                          os.path.join(root, "pedro_ext", "reference.py")],
                         capture_output=True, text=True, env=env, cwd=stub, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
