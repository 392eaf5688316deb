import pytest
import torch

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def pytest_make_parametrize_id(config, val, argname):
    """Readable test ids in every file: float16 instead of dtype0, 3x300x37 instead of shape1,
    so `-k` expressions (bench/gpu_check.sh's sanitizer subset) can select by dtype and shape."""
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    if isinstance(val, tuple) and val and all(isinstance(v, int) for v in val):
        return "x".join(map(str, val))
    return None

# Tolerance (relative to the magnitude of the expected values) per dtype, for kernels that
# accumulate in fp32 (fp64 for float64) and round the result once.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def assert_close(actual, expected, dtype, what="", tol=None):
    """actual (in `dtype`) against a float64 reference, scaled by the reference's magnitude."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == dtype, (what, actual.dtype, dtype)
    exp = expected.detach().double().cpu()
    act = actual.detach().double().cpu()
    scale = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    tol = TOL[dtype] if tol is None else tol
    torch.testing.assert_close(act, exp, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")
