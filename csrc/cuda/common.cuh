// Device helpers and host-side launch helpers shared by the CUDA kernels. Every launch goes on
// the current stream, checks its grid against the hardware limits, and accumulates in fp32
// (fp64 for double). Invalid ids follow the rule in pedro.h.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "../pedro.h"

namespace pedro_ext {
namespace cuda_kernels {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T nan_value() {
  return static_cast<T>(std::numeric_limits<float>::quiet_NaN());
}

template <typename T>
__device__ __forceinline__ at::opmath_type<T> to_acc(T v) {
  return static_cast<at::opmath_type<T>>(v);
}

__device__ __forceinline__ unsigned misalignment(const void* p) {
  return static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) % 16);
}

// Elements before the first 16-byte boundary of p, when every pointer of a span shares p's
// misalignment; n (all scalar) when they differ.
template <typename T>
__device__ __forceinline__ int64_t aligned_head(int64_t n, unsigned common_misalignment,
                                                bool same) {
  if (!same) return n;
  const int64_t head =
      common_misalignment == 0 ? 0 : static_cast<int64_t>((16 - common_misalignment) / sizeof(T));
  return head < n ? head : n;
}

// One warp computes y[0:n] = x[0:n] * v[0:n]: scalar head up to 16-byte alignment, 16-byte
// body, scalar tail. y may be x (modulate_): each lane reads its elements before writing them.
template <typename T>
__device__ void scale_span(T* y, const T* x, const T* v, int64_t n, int lane) {
  using P = Pack<T>;
  constexpr int V = P::kSize;
  const unsigned ax = misalignment(x);
  const int64_t head = aligned_head<T>(n, ax, ax == misalignment(y) && ax == misalignment(v));
  for (int64_t j = lane; j < head; j += 32) y[j] = static_cast<T>(to_acc(x[j]) * to_acc(v[j]));
  const int64_t nvec = (n - head) / V;
  const P* xv = reinterpret_cast<const P*>(x + head);
  const P* vv = reinterpret_cast<const P*>(v + head);
  P* yv = reinterpret_cast<P*>(y + head);
  for (int64_t i = lane; i < nvec; i += 32) {
    const P a = xv[i], b = vv[i];
    P c;
#pragma unroll
    for (int e = 0; e < V; ++e) c.v[e] = static_cast<T>(to_acc(a.v[e]) * to_acc(b.v[e]));
    yv[i] = c;
  }
  for (int64_t j = head + nvec * V + lane; j < n; j += 32)
    y[j] = static_cast<T>(to_acc(x[j]) * to_acc(v[j]));
}

template <typename T>
__device__ void fill_span(T* y, int64_t n, T value, int lane) {
  for (int64_t j = lane; j < n; j += 32) y[j] = value;
}

// The rows of each request: b*T .. b*T+T-1 (padded) or order[starts[b] .. starts[b+1])
// (packed, from group_rows). Rows with an invalid seq id sit at order[0 .. starts[0]) and
// order[starts[B] .. S).
struct RowGroups {
  const int64_t* order;  // null: padded
  const int64_t* starts;
  int64_t T;
  int64_t groups;  // B
  int64_t total;   // S
  __device__ int64_t begin(int64_t b) const { return order ? starts[b] : b * T; }
  __device__ int64_t end(int64_t b) const { return order ? starts[b + 1] : (b + 1) * T; }
  __device__ int64_t row(int64_t q) const { return order ? order[q] : q; }
};

// out[i] = sum over z = 0, 1, ... of partial[z * n + i], in that order, rounded once to T.
template <typename T>
__global__ void sum_splits_kernel(const at::opmath_type<T>* partial, int64_t splits, int64_t n,
                                  T* out) {
  using acc_t = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    acc_t s = 0;
    for (int64_t z = 0; z < splits; ++z) s += partial[z * n + i];
    out[i] = static_cast<T>(s);
  }
}


// ---------------------------------------------------------------- host helpers --------
// Blocks for a grid-stride loop whose partition does not change any result (elementwise work).
inline unsigned int blocks_for(int64_t work, int64_t per_block) {
  const int64_t cap = (int64_t)at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 32;
  return (unsigned int)std::max<int64_t>(1, std::min<int64_t>(cap, (work + per_block - 1) / per_block));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A launch grid, refused with a clear error when a dimension exceeds the hardware limits.
inline dim3 checked_grid(const char* op, int64_t x, int64_t y = 1, int64_t z = 1) {
  TORCH_CHECK_VALUE(x >= 1 && x <= kMaxGridX && y >= 1 && y <= kMaxGridYZ && z >= 1 &&
                        z <= kMaxGridYZ,
                    op, ": the problem needs a CUDA grid of (", x, ", ", y, ", ", z,
                    ") blocks, beyond the limits (", kMaxGridX, ", ", kMaxGridYZ, ", ",
                    kMaxGridYZ, "); split the batch or the vector width");
  return dim3((unsigned)x, (unsigned)y, (unsigned)z);
}

// Index-range check of a CUDA op: one host sync for all ranges, skipped when the caller
// validated the ids (check_ids=False), when disabled globally, and during graph capture.
inline void maybe_check_ranges(const char* op, bool check_ids,
                               std::initializer_list<IdRange> ranges) {
  if (check_ids && cuda_index_checks_enabled() &&
      at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None)
    check_index_ranges(op, ranges);
}

inline Tensor acc_empty(const Tensor& like, at::IntArrayRef sizes) {
  return at::empty(sizes, like.options().dtype(at::toOpMathType(like.scalar_type())));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// RowGroups of a modulate-like call; `keep` holds group_rows' tensors alive for the launch.
inline RowGroups row_groups(const ModulateSizes& s, const std::optional<Tensor>& seq_ids,
                            std::tuple<Tensor, Tensor>& keep) {
  RowGroups rows{nullptr, nullptr, s.T, s.B, s.S};
  if (seq_ids.has_value()) {
    keep = group_rows(*seq_ids, s.B);
    rows.order = std::get<0>(keep).data_ptr<int64_t>();
    rows.starts = std::get<1>(keep).data_ptr<int64_t>();
  }
  return rows;
}

template <typename T>
void launch_sum_splits(const Tensor& partial, int64_t splits, const Tensor& out,
                       cudaStream_t stream) {
  const int64_t n = out.numel();
  if (n == 0) return;
  sum_splits_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
      partial.data_ptr<at::opmath_type<T>>(), splits, n, out.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_kernels
}  // namespace pedro_ext
