"""Fused multi-LoRA for decoding, BGMV style (punica / vLLM), in Triton: LoRA at its best.

y[m] += scale * (x[m] @ A[ids[m // rows_per_id]]) @ B[ids[m // rows_per_id]]   for every row m

in two launches, as punica does:
- shrink: row m and one slice of the hidden dimension per program (split-K, so that a decode
  batch of a few rows still fills the GPU) write fp32 partial sums [splits, M, r];
- expand: row m and one block of output columns per program sum the partials in a fixed order
  (deterministic, no atomics, no zero-fill launch), multiply by B[adapter] and add into y in
  place, so the base projection's output is read and written once.
Adapter weights are gathered by index inside the kernels (no [B, d, r] copy as gather+bmm
makes). A row whose id is -1 (no LoRA) is left unchanged; an id outside [-1, N) is a caller
error that the kernels never turn into an out-of-bounds read (the row is left unchanged too):
validate ids where they are built, with `check_ids`, as the benchmark does.

Layouts: x [M, d] (unit stride along d), A [N, d, r], B [N, r, out], y [M, out], ids [M // rows_per_id]
int64; x, A, B and y share one floating dtype; accumulation in fp32. Block sizes are fixed
(untuned: vLLM ships tuned configs per GPU; these are sensible defaults, not the optimum).

The op `torch.ops.pedro_ext_bench.lora_bgmv_` (mutates y, has a fake kernel) works in
torch.compile and under CUDA-graph capture. Triton is optional: `unavailable_reason(device)`
says why the kernels cannot run (no Triton, no GPU); the CPU runs them only under
TRITON_INTERPRET=1 (the correctness tests do).
"""
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the benchmark skips lora_bgmv with this reason
    triton = None
    _IMPORT_ERROR = f"Triton is not importable ({e})"
else:
    _IMPORT_ERROR = None

MAX_SPLITS = 64
_GRID_X_MAX = 2 ** 31 - 1
_GRID_Y_MAX = 65535


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device) -> Optional[str]:
    """None where the kernels can run on `device`, else why not."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device.type == "cpu" and interpreting():
        return None
    return (f"Triton kernels need a CUDA device ({device.type} given; the CPU runs them only "
            "under TRITON_INTERPRET=1, a correctness mode, far too slow to time)")


if triton is not None:
    # sizes are runtime values: one compiled kernel per (dtype, rank block), not one per shape
    @triton.jit(do_not_specialize=["K", "R", "rows_per_id", "n_adapters", "k_per_split"])
    def _shrink_kernel(x_ptr, a_ptr, ids_ptr, part_ptr, K, R, rows_per_id, n_adapters,
                       k_per_split, stride_xm, stride_an, stride_ak, stride_ar, stride_ps,
                       stride_pm, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        adapter = tl.load(ids_ptr + row // rows_per_id).to(tl.int64)
        if (adapter < 0) | (adapter >= n_adapters):
            return
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        x_row = x_ptr + row * stride_xm
        a_mat = a_ptr + adapter * stride_an
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        # (bounds a plain argument: the Triton interpreter of torch 2.11's image cannot take a
        # computed scalar as a range bound; the last split's steps past K are masked)
        for k0 in range(0, k_per_split, BLOCK_K):
            offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_end
            x = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            a = tl.load(a_mat + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                        mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None] * a, axis=0)
        tl.store(part_ptr + split * stride_ps + row * stride_pm + offs_r, acc, mask=r_ok)

    @triton.jit(do_not_specialize=["N_OUT", "R", "rows_per_id", "n_adapters", "n_splits"])
    def _expand_kernel(part_ptr, b_ptr, ids_ptr, y_ptr, N_OUT, R, rows_per_id, n_adapters,
                       n_splits, scale, stride_ps, stride_pm, stride_bn, stride_br, stride_bo,
                       stride_ym, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_S: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col_block = tl.program_id(1)
        adapter = tl.load(ids_ptr + row // rows_per_id).to(tl.int64)
        if (adapter < 0) | (adapter >= n_adapters):
            return
        offs_s = tl.arange(0, BLOCK_S)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        part = tl.load(part_ptr + offs_s[:, None] * stride_ps + row * stride_pm + offs_r[None, :],
                       mask=(offs_s[:, None] < n_splits) & r_ok[None, :], other=0.0)
        h = tl.sum(part, axis=0)  # [BLOCK_R], fp32, the same order on every run
        offs_n = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_OUT
        b = tl.load(b_ptr + adapter * stride_bn + offs_r[:, None] * stride_br
                    + offs_n[None, :] * stride_bo, mask=r_ok[:, None] & n_ok[None, :],
                    other=0.0).to(tl.float32)
        delta = tl.sum(h[:, None] * b, axis=0) * scale
        y_ptrs = y_ptr + row * stride_ym + offs_n
        y = tl.load(y_ptrs, mask=n_ok, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=n_ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _check(y, x, a, b, ids, rows_per_id):
    def fail(msg):
        raise ValueError(f"lora_bgmv_: {msg}")

    if x.dim() != 2 or y.dim() != 2:
        fail(f"x and y must be 2-D [M, d] / [M, out], got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if a.dim() != 3 or b.dim() != 3:
        fail(f"a must be [N, d, r] and b [N, r, out], got a {tuple(a.shape)}, b {tuple(b.shape)}")
    m, d = x.shape
    n, r, out = b.shape
    if a.shape != (n, d, r):
        fail(f"a has shape {tuple(a.shape)}, expected (N={n}, d={d}, r={r}) from x and b")
    if y.shape != (m, out):
        fail(f"y has shape {tuple(y.shape)}, expected (M={m}, out={out})")
    if ids.dim() != 1 or ids.dtype != torch.int64:
        fail(f"ids must be a 1-D int64 tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    if rows_per_id < 1 or ids.shape[0] * rows_per_id != m:
        fail(f"ids has {ids.shape[0]} entries and rows_per_id={rows_per_id}, but x has {m} rows")
    if len({t.dtype for t in (x, y, a, b)}) != 1 or not x.is_floating_point():
        fail(f"x, y, a, b must share one floating dtype, got {x.dtype}, {y.dtype}, {a.dtype}, "
             f"{b.dtype}")
    if len({t.device for t in (x, y, a, b, ids)}) != 1:
        fail("x, y, a, b and ids must be on one device, got "
             f"{[str(t.device) for t in (x, y, a, b, ids)]}")
    if x.stride(1) != 1 or y.stride(1) != 1 or (ids.numel() > 1 and ids.stride(0) != 1):
        fail("x and y need unit stride along their last dimension, ids a contiguous vector")
    if m > _GRID_X_MAX:
        fail(f"{m} rows exceed the launch grid's limit of {_GRID_X_MAX}")


def check_ids(ids_cpu: torch.Tensor, n_adapters: int) -> None:
    """Where ids are built (on the host): every id in [-1, n_adapters)."""
    bad = (ids_cpu < -1) | (ids_cpu >= n_adapters)
    if bool(bad.any()):
        raise ValueError(f"lora_bgmv ids must lie in [-1, {n_adapters}), got "
                         f"{ids_cpu[bad][:8].tolist()}")


def lora_bgmv_impl(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   ids: torch.Tensor, rows_per_id: int, scale: float) -> None:
    _check(y, x, a, b, ids, rows_per_id)
    reason = unavailable_reason(x.device)
    if reason:
        raise RuntimeError(f"lora_bgmv_: {reason}")
    m, d = x.shape
    n, r, out = b.shape
    if m == 0 or out == 0:
        return
    block_r = max(2, _next_pow2(r))
    block_k = min(256, max(32, 4096 // block_r))
    block_n = min(256, max(64, 4096 // block_r))
    # enough (row, split) programs for about two waves of the GPU's multiprocessors
    splits = max(1, min(MAX_SPLITS, triton.cdiv(d, block_k), triton.cdiv(2 * _sm_count(x.device), m)))
    k_per_split = triton.cdiv(triton.cdiv(d, splits), block_k) * block_k
    splits = triton.cdiv(d, k_per_split) if d else 1
    col_blocks = triton.cdiv(out, block_n)
    if col_blocks > _GRID_Y_MAX:
        raise ValueError(f"lora_bgmv_: out={out} needs {col_blocks} column blocks, above the grid "
                         f"limit {_GRID_Y_MAX}")
    part = torch.empty((splits, m, r), device=x.device, dtype=torch.float32)
    _shrink_kernel[(m, splits)](x, a, ids, part, d, r, rows_per_id, n, k_per_split, x.stride(0),
                                a.stride(0), a.stride(1), a.stride(2), part.stride(0),
                                part.stride(1), BLOCK_K=block_k, BLOCK_R=block_r)
    _expand_kernel[(m, col_blocks)](part, b, ids, y, out, r, rows_per_id, n, splits, float(scale),
                                    part.stride(0), part.stride(1), b.stride(0), b.stride(1),
                                    b.stride(2), y.stride(0), BLOCK_N=block_n, BLOCK_R=block_r,
                                    BLOCK_S=MAX_SPLITS)


_lib = torch.library.Library("pedro_ext_bench", "DEF")
_lib.define("lora_bgmv_(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor ids, int rows_per_id, "
            "float scale) -> ()")
for _key in ("CUDA", "CPU"):
    _lib.impl("lora_bgmv_", lora_bgmv_impl, _key)


@torch.library.register_fake("pedro_ext_bench::lora_bgmv_")
def _(y, x, a, b, ids, rows_per_id, scale):
    _check(y, x, a, b, ids, rows_per_id)


def lora_bgmv(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              ids: torch.Tensor, scale: float) -> torch.Tensor:
    """Semantics: y + scale * (x @ A[ids]) @ B[ids] per request, y updated in place and returned;
    x [B, T, d] or [B, d], y [B, T, out] or [B, out], ids [B] (one adapter per request, -1 none)."""
    rows_per_id = x.shape[1] if x.dim() == 3 else 1
    torch.ops.pedro_ext_bench.lora_bgmv_(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), a,
                                         b, ids, rows_per_id, scale)
    return y
