"""Loads the compiled extension and reports how it was built."""
import torch

try:
    from . import _C  # registers the torch.ops.pedro_ext kernels
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "pedro_ext's compiled extension (pedro_ext._C) is missing or does not match this torch "
        f"({torch.__version__}). Build it from the source checkout with\n"
        "    pip install --no-build-isolation -e .\n"
        "(add PEDRO_EXT_NO_CUDA=1 for a CPU-only build). Original error: " + str(exc)
    ) from exc


def build_info() -> dict:
    """torch version, whether the CUDA kernels were compiled and for which architectures, the
    instruction set the CPU kernels' elementwise loops run with on this CPU, and whether the
    build could choose one (GCC builds on x86-64 have an AVX2 and a baseline clone)."""
    archs = [a for a in _C.cuda_arch_list.replace(",", ";").split(";") if a]
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": bool(_C.with_cuda),
        "cuda_archs": archs,
        "cuda_available": torch.cuda.is_available(),
        "cpu_kernel_isa": _C.cpu_kernel_isa(),
        "cpu_kernel_clones": _C.cpu_kernel_clones(),
    }


def set_cuda_index_checks(enabled: bool) -> None:
    """Process-wide switch of the CUDA ops' id range check (one host sync per call; never done
    during CUDA-graph capture). A process setting for servers that build the ids themselves: it
    holds for every thread, model and caller in the process until switched back, so do not
    toggle it around single calls (another thread's calls would run unchecked). Per-call
    control is the ops' check_ids keyword: a caller that validated one call's ids passes
    check_ids=False to that op. Unchecked invalid ids are never read: the rows they select come
    out as NaN (the rule in pedro_ext.ops)."""
    _C.set_cuda_index_checks(bool(enabled))
