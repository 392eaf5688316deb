"""Builds pedro_ext._C: the CPU kernels always, the CUDA kernels whenever a CUDA build of torch
and the CUDA toolkit are present (no GPU needed).

Environment:
  FORCE_CUDA=1             build the CUDA kernels, fail if that is impossible
  PEDRO_EXT_NO_CUDA=1      CPU kernels only
  TORCH_CUDA_ARCH_LIST     e.g. "8.0;9.0" (the default here: sm_80 and sm_90)
  MAX_JOBS, NVCC_THREADS   parallel compile jobs / nvcc threads per job

Build against the installed torch: `pip install --no-build-isolation .` (see _require_torch).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _find_cuda_home():
    """CUDA_HOME as torch would want it. torch derives it from `which nvcc`, which is wrong when
    nvcc on PATH is a wrapper script (as on our machines): accept only a folder with headers."""
    def is_toolkit(path):
        return path and os.path.exists(os.path.join(path, "include", "cuda_runtime.h"))

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((c for c in candidates if is_toolkit(c)), None)


def _require_torch():
    """Stop at once, saying why and what to type, when torch cannot be imported.

    The extension is compiled against torch's C++ headers and links to its libraries, so it
    must be built with the very torch it will run with. torch is therefore not a declared
    build requirement (pyproject.toml): under pip's default build isolation that would
    download a second torch (gigabytes for a CUDA build) into a throw-away environment and
    compile against it, and an extension built against another torch version or CUDA variant
    than the installed one fails to load (undefined symbols) or crashes. flash-attn and apex
    ask for --no-build-isolation for the same reason."""
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    # pip's isolated build environment hides site-packages through PYTHONPATH (a
    # sitecustomize) and PYTHONNOUSERSITE; without them the same interpreter sees the real ones.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    if probe.returncode == 0:
        found = (f"torch {probe.stdout.strip()} is installed for {sys.executable}, but this build "
                 "cannot import it: pip builds in an isolated environment by default, which "
                 "hides the installed packages.")
    else:
        found = f"torch is not installed for {sys.executable}: install it first (pip install torch)."
    sys.exit(
        "pedro_ext: cannot build without torch.\n"
        f"{found}\n"
        "pedro_ext compiles C++/CUDA kernels against the torch it will run with, so it builds\n"
        "with the installed torch and no build isolation:\n"
        "    pip install --no-build-isolation .        (or: pip install --no-build-isolation -e .)\n"
        "Declaring torch as a build requirement instead would compile against a second, freshly\n"
        "downloaded torch that need not match the installed one (the extension would then fail to\n"
        "load), and download gigabytes on every build.")


_require_torch()
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    if os.environ.get("PEDRO_EXT_NO_CUDA", "0") == "1":
        return False
    possible = torch.version.cuda is not None and _cuda_home is not None
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if not possible:
            sys.exit(
                "FORCE_CUDA=1 but CUDA kernels cannot be built: torch "
                f"{torch.__version__} (CUDA {torch.version.cuda}), CUDA toolkit at {_cuda_home}"
            )
        return True
    return possible


def _nvidia_include_dirs():
    """Headers torch's CUDA headers include (cuBLAS, cuSPARSE, ...) from the pip nvidia wheels."""
    dirs = []
    for base in {os.path.dirname(os.path.dirname(torch.__file__))}:
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(d for d in dirs if os.path.isdir(d))


def _extension():
    sources = ["csrc/ops.cpp", "csrc/checks.cpp", "csrc/grouping.cpp", "csrc/autograd.cpp",
               "csrc/cpu/ops_cpu.cpp", "csrc/python_module.cpp"]
    cxx = ["-O3", "-fopenmp"]  # at::parallel_for is serial in a TU built without OpenMP
    link = ["-fopenmp"]
    if not _want_cuda():
        return CppExtension("pedro_ext._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    defines = ["-DPEDRO_EXT_WITH_CUDA", f'-DPEDRO_EXT_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "-lineinfo", f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
    return CUDAExtension(
        "pedro_ext._C",
        sources + ["csrc/cuda/ops_cuda.cu"],
        include_dirs=_nvidia_include_dirs(),
        extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
        extra_link_args=link,
    )


setup(
    name="pedro_ext",
    version="0.1.0",
    description="PEDRO (prompt-dependent representation modification) kernels for PyTorch",
    packages=find_packages(include=["pedro_ext", "pedro_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "transformers", "safetensors", "tqdm"],
    extras_require={"bench": ["peft", "matplotlib"], "test": ["pytest", "peft"]},
)
