// CUDA kernels. All launches go on the current stream, accumulate in fp32 (fp64 for double),
// and make no host syncs except the optional index-range check outside graph capture.
// Out-of-range indices that reach a kernel (checks disabled, or during capture) are never
// dereferenced: the affected rows are filled with NaN so the error cannot go unnoticed.
//
//   generate:               shrink (one block per request: z = pooled @ w_down + b_down)
//                           + expand (R(z) @ w_up + b_up + 1, one block per 256 columns)
//   generate_and_modulate:  the same shrink + one expand launch that also scales every token
//                           of the request with the freshly computed tile (the fused prefill)
//   modulate:               one warp per (row, 1024-element chunk), 16-byte loads/stores
//   backward:               per-request kernel, then per-adapter kernels that sum the
//                           requests of each adapter in a fixed (stable-sorted) order
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../pedro.h"
#include "../rational.h"

namespace pedro_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = kThreads;  // vector columns per expand block
constexpr int64_t kMaxRankCuda = 1024;
constexpr int kMaxCoefCuda = 32;

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
__device__ __forceinline__ T mul(T a, T b) {
  using acc_t = at::opmath_type<T>;
  return static_cast<T>(static_cast<acc_t>(a) * static_cast<acc_t>(b));
}

// One warp computes y[0:n] = x[0:n] * v[0:n]: scalar head up to 16-byte alignment, 16-byte
// body, scalar tail. Spans whose three pointers are misaligned differently stay scalar.
template <typename T>
__device__ void scale_span(T* y, const T* x, const T* v, int64_t n, int lane) {
  using P = Pack<T>;
  constexpr int V = P::kSize;
  const auto ax = reinterpret_cast<uintptr_t>(x) % 16;
  int64_t head = n;
  if (ax == reinterpret_cast<uintptr_t>(y) % 16 && ax == reinterpret_cast<uintptr_t>(v) % 16) {
    head = ax == 0 ? 0 : static_cast<int64_t>((16 - ax) / sizeof(T));
    if (head > n) head = n;
  }
  for (int64_t j = lane; j < head; j += 32) y[j] = mul(x[j], v[j]);
  const int64_t nvec = (n - head) / V;
  const P* xv = reinterpret_cast<const P*>(x + head);
  const P* vv = reinterpret_cast<const P*>(v + head);
  P* yv = reinterpret_cast<P*>(y + head);
  for (int64_t i = lane; i < nvec; i += 32) {
    const P a = xv[i], b = vv[i];
    P c;
#pragma unroll
    for (int e = 0; e < V; ++e) c.v[e] = mul(a.v[e], b.v[e]);
    yv[i] = c;
  }
  for (int64_t j = head + nvec * V + lane; j < n; j += 32) y[j] = mul(x[j], v[j]);
}

template <typename T>
__device__ void fill_span(T* y, int64_t n, T value, int lane) {
  for (int64_t j = lane; j < n; j += 32) y[j] = value;
}

// ---------------------------------------------------------------- rational ------------
template <typename T>
__global__ void rational_kernel(const T* x, T* y, int64_t n, const T* num, int nl, const T* den,
                                int dl) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t cn[kMaxCoefCuda], cd[kMaxCoefCuda];
  if (threadIdx.x < nl) cn[threadIdx.x] = static_cast<acc_t>(num[threadIdx.x]);
  if (threadIdx.x < dl) cd[threadIdx.x] = static_cast<acc_t>(den[threadIdx.x]);
  __syncthreads();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    y[i] = static_cast<T>(rational_value<acc_t>(static_cast<acc_t>(x[i]), cn, nl, cd, dl));
}

// Each block writes its partial coefficient gradients to partial[block]; the partials are
// summed afterwards in block order, so the result is the same on every run.
template <typename T>
__global__ void rational_backward_kernel(const T* grad, const T* x, T* grad_x, int64_t n,
                                         const T* num, int nl, const T* den, int dl,
                                         at::opmath_type<T>* partial) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t cn[kMaxCoefCuda], cd[kMaxCoefCuda];
  __shared__ acc_t red[kWarps][2 * kMaxCoefCuda];
  if (threadIdx.x < nl) cn[threadIdx.x] = static_cast<acc_t>(num[threadIdx.x]);
  if (threadIdx.x < dl) cd[threadIdx.x] = static_cast<acc_t>(den[threadIdx.x]);
  __syncthreads();
  acc_t gc[2 * kMaxCoefCuda];
  for (int c = 0; c < nl + dl; ++c) gc[c] = acc_t(0);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const acc_t z = static_cast<acc_t>(x[i]);
    const acc_t g = static_cast<acc_t>(grad[i]);
    const auto t = rational_terms<acc_t>(z, cn, nl, cd, dl);
    grad_x[i] = static_cast<T>(g * rational_dz(t));
    rational_coef_grads_accumulate(z, g, t, gc, nl, gc + nl, dl);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int c = 0; c < nl + dl; ++c) {
    const acc_t s = warp_sum(gc[c]);
    if (lane == 0) red[warp][c] = s;
  }
  __syncthreads();
  if (threadIdx.x < nl + dl) {
    acc_t s = 0;
    for (int w = 0; w < kWarps; ++w) s += red[w][threadIdx.x];
    partial[blockIdx.x * (nl + dl) + threadIdx.x] = s;
  }
}

// ---------------------------------------------------------------- generate ------------
struct BankView {  // element strides of the adapter bank, as passed in (slices allowed)
  int64_t N, d, r, D, nl, dl;
  int64_t wu_s0, wu_s1, bu_s0;
};

// z[b, k] = pooled[b] @ w_down[a, :, k] + b_down[a, k]; one block per request, one warp per k.
// Rows with no adapter get 0; rows with an invalid adapter get NaN.
template <typename T, typename I>
__global__ void shrink_kernel(const T* pooled, const I* ids, const T* wd, const T* bd,
                              BankView bv, at::opmath_type<T>* z) {
  using acc_t = at::opmath_type<T>;
  const int64_t b = blockIdx.x;
  const int64_t a = static_cast<int64_t>(ids[b]);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  acc_t* zb = z + b * bv.r;
  if (a < 0 || a >= bv.N) {
    const acc_t fill = a == -1 ? acc_t(0) : static_cast<acc_t>(NAN);
    for (int64_t k = threadIdx.x; k < bv.r; k += blockDim.x) zb[k] = fill;
    return;
  }
  const T* p = pooled + b * bv.d;
  const T* w = wd + a * bv.d * bv.r;
  for (int64_t k = warp; k < bv.r; k += kWarps) {
    acc_t s = 0;
    for (int64_t i = lane; i < bv.d; i += 32)
      s += static_cast<acc_t>(p[i]) * static_cast<acc_t>(w[i * bv.r + k]);
    s = warp_sum(s);
    if (lane == 0) zb[k] = s + static_cast<acc_t>(bd[a * bv.r + k]);
  }
}

// Rows of request b: b*T .. b*T+T-1 (padded) or order[starts[b] .. starts[b+1]) (packed).
struct RowGroups {
  const int64_t* order;
  const int64_t* starts;
  int64_t T;
  __device__ int64_t begin(int64_t b) const { return order ? starts[b] : b * T; }
  __device__ int64_t end(int64_t b) const { return order ? starts[b + 1] : (b + 1) * T; }
  __device__ int64_t row(int64_t q) const { return order ? order[q] : q; }
};

// v[b, c] = 1 + R(z[b]) @ w_up[a, :, c] + b_up[a, c] for one 256-column tile; with kModulate
// the tile is then applied to every row of request b: y = x * v (the fused prefill path).
template <typename T, typename I, bool kModulate>
__global__ void expand_kernel(const at::opmath_type<T>* z, const I* ids, const T* num,
                              const T* den, const T* wu, const T* bu, BankView bv, T* vectors,
                              const T* x, T* y, RowGroups rows) {
  using acc_t = at::opmath_type<T>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* h = reinterpret_cast<acc_t*>(smem_raw);
  __shared__ Pack<T> vtile_packed[kTile / Pack<T>::kSize];
  T* vtile = reinterpret_cast<T*>(vtile_packed);

  const int64_t b = blockIdx.x;
  const int64_t c0 = (int64_t)blockIdx.y * kTile;
  const int64_t col = c0 + threadIdx.x;
  const int64_t ncols = min((int64_t)kTile, bv.D - c0);
  const int64_t a = static_cast<int64_t>(ids[b]);
  const bool valid = a >= -1 && a < bv.N;
  if (a >= 0 && valid) {
    const T* cn = num + a * bv.nl;
    const T* cd = den + a * bv.dl;
    for (int64_t k = threadIdx.x; k < bv.r; k += blockDim.x)
      h[k] = rational_value<acc_t>(z[b * bv.r + k], cn, (int)bv.nl, cd, (int)bv.dl);
  }
  __syncthreads();
  if (col < bv.D) {
    T v;
    if (!valid) {
      v = nan_value<T>();
    } else if (a < 0) {
      v = T(1);
    } else {
      const T* w = wu + a * bv.wu_s0 + col;
      acc_t s = static_cast<acc_t>(bu[a * bv.bu_s0 + col]);
      for (int64_t k = 0; k < bv.r; ++k) s += h[k] * static_cast<acc_t>(w[k * bv.wu_s1]);
      v = static_cast<T>(acc_t(1) + s);
    }
    vectors[b * bv.D + col] = v;
    if (kModulate) vtile[threadIdx.x] = v;
  }
  if (kModulate) {
    __syncthreads();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int64_t q = rows.begin(b) + warp; q < rows.end(b); q += kWarps) {
      const int64_t row = rows.row(q);
      scale_span(y + row * bv.D + c0, x + row * bv.D + c0, vtile, ncols, lane);
    }
  }
}

// ---------------------------------------------------------------- modulate ------------
template <typename T, typename I>
__global__ void modulate_kernel(const T* x, const T* v, int64_t v_stride, T* y, const I* seq_ids,
                                int64_t S, int64_t D, int64_t B, int64_t T_len, int64_t chunk) {
  const int lane = threadIdx.x % 32;
  const int64_t chunks = (D + chunk - 1) / chunk;
  const int64_t units = S * chunks;
  for (int64_t u = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32; u < units;
       u += (int64_t)gridDim.x * blockDim.x / 32) {
    const int64_t row = u / chunks, c0 = (u % chunks) * chunk;
    const int64_t n = min(chunk, D - c0);
    const int64_t b = seq_ids ? static_cast<int64_t>(seq_ids[row]) : row / T_len;
    T* yr = y + row * D + c0;
    if (b < 0 || b >= B) {
      fill_span(yr, n, nan_value<T>(), lane);
    } else {
      scale_span(yr, x + row * D + c0, v + b * v_stride + c0, n, lane);
    }
  }
}

// grad_v[b, c] = sum over rows of b (fixed order) of grad[row, c] * x[row, c].
template <typename T>
__global__ void modulate_backward_kernel(const T* grad, const T* x, T* out, int64_t D,
                                         RowGroups rows, bool vec_ok) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T>;
  constexpr int V = P::kSize;
  const int64_t b = blockIdx.x;
  const int64_t c = ((int64_t)blockIdx.y * blockDim.x + threadIdx.x) * V;
  if (c >= D) return;
  acc_t acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = 0;
  const bool full = vec_ok && c + V <= D;
  for (int64_t q = rows.begin(b); q < rows.end(b); ++q) {
    const int64_t off = rows.row(q) * D + c;
    if (full) {
      const P g = *reinterpret_cast<const P*>(grad + off);
      const P xv = *reinterpret_cast<const P*>(x + off);
#pragma unroll
      for (int e = 0; e < V; ++e)
        acc[e] += static_cast<acc_t>(g.v[e]) * static_cast<acc_t>(xv.v[e]);
    } else {
      for (int e = 0; e < V && c + e < D; ++e)
        acc[e] += static_cast<acc_t>(grad[off + e]) * static_cast<acc_t>(x[off + e]);
    }
  }
  for (int e = 0; e < V && c + e < D; ++e) out[b * D + c + e] = static_cast<T>(acc[e]);
}

// ---------------------------------------------------------------- generate backward ---
// Per request: h = R(z), gh = w_up[a] @ g, gz = gh * R'(z), coefficient grads of this
// request, grad_pooled = w_down[a] @ gz. One block per request.
template <typename T, typename I>
__global__ void backward_request_kernel(const at::opmath_type<T>* z, const I* ids, const T* grad,
                                        const T* wd, const T* num, const T* den, const T* wu,
                                        BankView bv, at::opmath_type<T>* h_out,
                                        at::opmath_type<T>* gz_out, at::opmath_type<T>* gc_out,
                                        T* grad_pooled) {
  using acc_t = at::opmath_type<T>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* gh = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* gz = gh + bv.r;
  const int64_t b = blockIdx.x;
  const int64_t a = static_cast<int64_t>(ids[b]);
  const int64_t nc = bv.nl + bv.dl;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (a < 0 || a >= bv.N) {
    for (int64_t i = threadIdx.x; i < bv.d; i += blockDim.x) grad_pooled[b * bv.d + i] = T(0);
    for (int64_t k = threadIdx.x; k < bv.r; k += blockDim.x)
      h_out[b * bv.r + k] = gz_out[b * bv.r + k] = 0;
    for (int64_t c = threadIdx.x; c < nc; c += blockDim.x) gc_out[b * nc + c] = 0;
    return;
  }
  const T* g = grad + b * bv.D;
  for (int64_t k = warp; k < bv.r; k += kWarps) {
    const T* w = wu + a * bv.wu_s0 + k * bv.wu_s1;
    acc_t s = 0;
    for (int64_t j = lane; j < bv.D; j += 32)
      s += static_cast<acc_t>(w[j]) * static_cast<acc_t>(g[j]);
    s = warp_sum(s);
    if (lane == 0) gh[k] = s;
  }
  __syncthreads();
  const T* cn = num + a * bv.nl;
  const T* cd = den + a * bv.dl;
  for (int64_t k = threadIdx.x; k < bv.r; k += blockDim.x) {
    const auto t = rational_terms<acc_t>(z[b * bv.r + k], cn, (int)bv.nl, cd, (int)bv.dl);
    h_out[b * bv.r + k] = t.p / t.q;
    gz[k] = gh[k] * rational_dz(t);
    gz_out[b * bv.r + k] = gz[k];
  }
  if (threadIdx.x == 0) {  // r * (m + n + 1) terms: one thread, fixed order
    acc_t gc[2 * kMaxCoefCuda];
    for (int c = 0; c < nc; ++c) gc[c] = 0;
    for (int64_t k = 0; k < bv.r; ++k) {
      const acc_t zk = z[b * bv.r + k];
      const auto t = rational_terms<acc_t>(zk, cn, (int)bv.nl, cd, (int)bv.dl);
      rational_coef_grads_accumulate(zk, gh[k], t, gc, (int)bv.nl, gc + bv.nl, (int)bv.dl);
    }
    for (int c = 0; c < nc; ++c) gc_out[b * nc + c] = gc[c];
  }
  __syncthreads();
  const T* w = wd + a * bv.d * bv.r;
  for (int64_t i = threadIdx.x; i < bv.d; i += blockDim.x) {
    acc_t s = 0;
    for (int64_t k = 0; k < bv.r; ++k) s += static_cast<acc_t>(w[i * bv.r + k]) * gz[k];
    grad_pooled[b * bv.d + i] = static_cast<T>(s);
  }
}

// grad_w_up[n, k, c] and grad_b_up[n, c]: one thread per column c of adapter n.
template <typename T>
__global__ void backward_up_kernel(const T* grad, const at::opmath_type<T>* h, BankView bv,
                                   RowGroups groups, T* g_wu, T* g_bu) {
  using acc_t = at::opmath_type<T>;
  const int64_t n = blockIdx.x;
  const int64_t c = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= bv.D) return;
  const int64_t q0 = groups.begin(n), q1 = groups.end(n);
  acc_t sb = 0;
  for (int64_t q = q0; q < q1; ++q) sb += static_cast<acc_t>(grad[groups.row(q) * bv.D + c]);
  g_bu[n * bv.D + c] = static_cast<T>(sb);
  for (int64_t k = 0; k < bv.r; ++k) {
    acc_t s = 0;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b = groups.row(q);
      s += h[b * bv.r + k] * static_cast<acc_t>(grad[b * bv.D + c]);
    }
    g_wu[(n * bv.r + k) * bv.D + c] = static_cast<T>(s);
  }
}

// grad_w_down[n, i, k] (one thread per element), and from the first block grad_b_down[n] and
// the coefficient grads of adapter n.
template <typename T>
__global__ void backward_down_kernel(const T* pooled, const at::opmath_type<T>* gz,
                                     const at::opmath_type<T>* gc, BankView bv, RowGroups groups,
                                     T* g_wd, T* g_bd, T* g_num, T* g_den) {
  using acc_t = at::opmath_type<T>;
  const int64_t n = blockIdx.x;
  const int64_t e = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
  const int64_t q0 = groups.begin(n), q1 = groups.end(n);
  if (e < bv.d * bv.r) {
    const int64_t i = e / bv.r, k = e % bv.r;
    acc_t s = 0;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b = groups.row(q);
      s += static_cast<acc_t>(pooled[b * bv.d + i]) * gz[b * bv.r + k];
    }
    g_wd[n * bv.d * bv.r + e] = static_cast<T>(s);
  }
  if (blockIdx.y != 0) return;
  const int64_t nc = bv.nl + bv.dl;
  for (int64_t t = threadIdx.x; t < bv.r + nc; t += blockDim.x) {
    acc_t s = 0;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b = groups.row(q);
      s += t < bv.r ? gz[b * bv.r + t] : gc[b * nc + (t - bv.r)];
    }
    if (t < bv.r) {
      g_bd[n * bv.r + t] = static_cast<T>(s);
    } else if (t - bv.r < bv.nl) {
      g_num[n * bv.nl + (t - bv.r)] = static_cast<T>(s);
    } else {
      g_den[n * bv.dl + (t - bv.r - bv.nl)] = static_cast<T>(s);
    }
  }
}

// ---------------------------------------------------------------- host helpers --------
unsigned int blocks_for(int64_t work, int64_t per_block) {
  const int64_t cap = (int64_t)at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 32;
  return (unsigned int)std::max<int64_t>(1, std::min<int64_t>(cap, (work + per_block - 1) / per_block));
}

void maybe_check_range(const char* op, const char* name, const Tensor& ids, int64_t lo,
                       int64_t hi) {
  if (cuda_index_checks_enabled() &&
      at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None)
    check_index_range(op, name, ids, lo, hi);
}

void check_cuda_limits(const char* op, const GenerateSizes& s) {
  TORCH_CHECK_VALUE(s.r <= kMaxRankCuda, op, ": r = ", s.r, " exceeds the CUDA kernels' limit of ",
                    kMaxRankCuda);
  TORCH_CHECK_VALUE(s.num_len <= kMaxCoefCuda && s.den_len <= kMaxCoefCuda, op,
                    ": the CUDA kernels support up to ", kMaxCoefCuda,
                    " coefficients in rat_num and rat_den, got ", s.num_len, " and ", s.den_len);
}

Tensor last_dim_contiguous(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

BankView bank_view(const GenerateSizes& s, const Tensor& w_up, const Tensor& b_up) {
  return BankView{s.N, s.d, s.r, s.D, s.num_len, s.den_len, w_up.stride(0), w_up.stride(1),
                  b_up.defined() ? b_up.stride(0) : 0};
}

Tensor acc_empty(const Tensor& like, at::IntArrayRef sizes) {
  return at::empty(sizes, like.options().dtype(at::toOpMathType(like.scalar_type())));
}

// z = pooled @ w_down[ids] + b_down[ids] in acc precision (both generate and its backward).
template <typename T, typename I>
void launch_shrink(const Tensor& pooled, const I* ids, const Tensor& w_down, const Tensor& b_down,
                   const BankView& bv, Tensor& z, cudaStream_t stream) {
  if (bv.r == 0 || pooled.size(0) == 0) return;
  shrink_kernel<T, I><<<pooled.size(0), kThreads, 0, stream>>>(
      pooled.data_ptr<T>(), ids, w_down.data_ptr<T>(), b_down.data_ptr<T>(), bv,
      z.data_ptr<at::opmath_type<T>>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shared by generate and generate_and_modulate: checks, shrink, expand (optionally fused).
std::tuple<Tensor, Tensor> generate_cuda_impl(const char* op, const Tensor* x_in,
                                              const std::optional<Tensor>& seq_ids,
                                              const Tensor& pooled_in, const Tensor& adapter_ids,
                                              const Tensor& w_down_in, const Tensor& b_down_in,
                                              const Tensor& rat_num_in, const Tensor& rat_den_in,
                                              const Tensor& w_up_in, const Tensor& b_up_in) {
  const GenerateSizes s = check_generate_args(op, pooled_in, adapter_ids, w_down_in, b_down_in,
                                              rat_num_in, rat_den_in, w_up_in, b_up_in);
  check_cuda_limits(op, s);
  ModulateSizes ms{0, s.D, s.B, 0};
  Tensor x, y;
  if (x_in) {
    ms = check_modulate_layout(op, *x_in, s.B, s.D, seq_ids);
    check_like(op, "x", *x_in, pooled_in, "pooled");
  }
  c10::cuda::CUDAGuard guard(pooled_in.device());
  maybe_check_range(op, "adapter_ids", adapter_ids, -1, s.N);
  if (x_in && seq_ids.has_value()) maybe_check_range(op, "seq_ids", *seq_ids, 0, s.B);
  const Tensor pooled = pooled_in.contiguous(), w_down = w_down_in.contiguous(),
               b_down = b_down_in.contiguous(), rat_num = rat_num_in.contiguous(),
               rat_den = rat_den_in.contiguous(), w_up = last_dim_contiguous(w_up_in),
               b_up = last_dim_contiguous(b_up_in), ids = adapter_ids.contiguous();
  Tensor vectors = at::empty({s.B, s.D}, pooled.options());
  if (x_in) {
    x = x_in->contiguous();
    y = at::empty_like(x);
  }
  if (s.B == 0 || s.D == 0) return {y, vectors};
  RowGroups rows{nullptr, nullptr, ms.T};
  Tensor order, starts;
  if (x_in && seq_ids.has_value()) {
    std::tie(order, starts) = group_rows(*seq_ids, s.B);
    rows.order = order.data_ptr<int64_t>();
    rows.starts = starts.data_ptr<int64_t>();
  }
  Tensor z = acc_empty(pooled, {s.B, s.r});
  const BankView bv = bank_view(s, w_up, b_up);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), "generate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "generate_cuda_ids", [&] {
      const index_t* idp = ids.data_ptr<index_t>();
      launch_shrink<scalar_t, index_t>(pooled, idp, w_down, b_down, bv, z, stream);
      const dim3 grid(s.B, (s.D + kTile - 1) / kTile);
      const size_t smem = s.r * sizeof(acc_t);
      auto launch = [&](auto kernel, const scalar_t* xp, scalar_t* yp) {
        kernel<<<grid, kThreads, smem, stream>>>(
            z.data_ptr<acc_t>(), idp, rat_num.data_ptr<scalar_t>(), rat_den.data_ptr<scalar_t>(),
            w_up.data_ptr<scalar_t>(), b_up.data_ptr<scalar_t>(), bv,
            vectors.data_ptr<scalar_t>(), xp, yp, rows);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (x_in) {
        launch(expand_kernel<scalar_t, index_t, true>, x.data_ptr<scalar_t>(),
               y.data_ptr<scalar_t>());
      } else {
        launch(expand_kernel<scalar_t, index_t, false>, nullptr, nullptr);
      }
    });
  });
  return {y, vectors};
}

}  // namespace

Tensor rational_cuda(const Tensor& x_in, const Tensor& rat_num_in, const Tensor& rat_den_in) {
  const char* op = "pedro_ext.rational";
  check_rational_args(op, x_in, rat_num_in, rat_den_in);
  TORCH_CHECK_VALUE(rat_num_in.numel() <= kMaxCoefCuda && rat_den_in.numel() <= kMaxCoefCuda, op,
                    ": the CUDA kernel supports up to ", kMaxCoefCuda, " coefficients each");
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), num = rat_num_in.contiguous(), den = rat_den_in.contiguous();
  Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rational_cuda", [&] {
    rational_kernel<scalar_t><<<blocks_for(x.numel(), kThreads), kThreads, 0,
                                at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel(), num.data_ptr<scalar_t>(),
        (int)num.numel(), den.data_ptr<scalar_t>(), (int)den.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> rational_backward_cuda(const Tensor& grad_in, const Tensor& x_in,
                                                          const Tensor& rat_num_in,
                                                          const Tensor& rat_den_in) {
  const char* op = "pedro_ext.rational_backward";
  check_rational_args(op, x_in, rat_num_in, rat_den_in);
  check_same_shape(op, "grad", grad_in, x_in, "x");
  TORCH_CHECK_VALUE(rat_num_in.numel() <= kMaxCoefCuda && rat_den_in.numel() <= kMaxCoefCuda, op,
                    ": the CUDA kernel supports up to ", kMaxCoefCuda, " coefficients each");
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), grad = grad_in.contiguous(), num = rat_num_in.contiguous(),
               den = rat_den_in.contiguous();
  const int nl = (int)num.numel(), dl = (int)den.numel();
  Tensor grad_x = at::empty_like(x);
  const unsigned int blocks = blocks_for(x.numel(), kThreads);
  Tensor partial = acc_empty(x, {(int64_t)blocks, nl + dl});
  if (x.numel() == 0) {
    partial.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rational_bwd_cuda", [&] {
      rational_backward_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
          x.numel(), num.data_ptr<scalar_t>(), nl, den.data_ptr<scalar_t>(), dl,
          partial.data_ptr<at::opmath_type<scalar_t>>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const Tensor total = partial.sum(0).to(x.scalar_type());
  return {grad_x.view(x_in.sizes()), total.slice(0, 0, nl).clone(), total.slice(0, nl).clone()};
}

Tensor generate_cuda(const Tensor& pooled, const Tensor& adapter_ids, const Tensor& w_down,
                     const Tensor& b_down, const Tensor& rat_num, const Tensor& rat_den,
                     const Tensor& w_up, const Tensor& b_up) {
  return std::get<1>(generate_cuda_impl("pedro_ext.generate", nullptr, std::nullopt, pooled,
                                        adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up));
}

std::tuple<Tensor, Tensor> generate_and_modulate_cuda(
    const Tensor& x, const std::optional<Tensor>& seq_ids, const Tensor& pooled,
    const Tensor& adapter_ids, const Tensor& w_down, const Tensor& b_down, const Tensor& rat_num,
    const Tensor& rat_den, const Tensor& w_up, const Tensor& b_up) {
  return generate_cuda_impl("pedro_ext.generate_and_modulate", &x, seq_ids, pooled, adapter_ids,
                            w_down, b_down, rat_num, rat_den, w_up, b_up);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> generate_backward_cuda(
    const Tensor& grad_in, const Tensor& pooled_in, const Tensor& adapter_ids,
    const Tensor& w_down_in, const Tensor& b_down_in, const Tensor& rat_num_in,
    const Tensor& rat_den_in, const Tensor& w_up_in) {
  const char* op = "pedro_ext.generate_backward";
  const GenerateSizes s = check_generate_args(op, pooled_in, adapter_ids, w_down_in, b_down_in,
                                              rat_num_in, rat_den_in, w_up_in, std::nullopt);
  check_cuda_limits(op, s);
  TORCH_CHECK_VALUE(grad_in.dim() == 2 && grad_in.size(0) == s.B && grad_in.size(1) == s.D, op,
                    ": grad must be [B, D] = [", s.B, ", ", s.D, "], got shape ", grad_in.sizes());
  c10::cuda::CUDAGuard guard(pooled_in.device());
  maybe_check_range(op, "adapter_ids", adapter_ids, -1, s.N);
  const Tensor grad = grad_in.to(pooled_in.scalar_type()).contiguous();
  const Tensor pooled = pooled_in.contiguous(), w_down = w_down_in.contiguous(),
               b_down = b_down_in.contiguous(), rat_num = rat_num_in.contiguous(),
               rat_den = rat_den_in.contiguous(), w_up = last_dim_contiguous(w_up_in),
               ids = adapter_ids.contiguous();
  const auto opts = pooled.options();
  Tensor g_pooled = at::empty({s.B, s.d}, opts), g_wd = at::empty({s.N, s.d, s.r}, opts),
         g_bd = at::empty({s.N, s.r}, opts), g_num = at::empty({s.N, s.num_len}, opts),
         g_den = at::empty({s.N, s.den_len}, opts), g_wu = at::empty({s.N, s.r, s.D}, opts),
         g_bu = at::empty({s.N, s.D}, opts);
  const int64_t nc = s.num_len + s.den_len;
  Tensor z = acc_empty(pooled, {s.B, s.r}), h = acc_empty(pooled, {s.B, s.r}),
         gz = acc_empty(pooled, {s.B, s.r}), gc = acc_empty(pooled, {s.B, nc});
  auto [order, starts] = group_rows(ids, s.N);
  const RowGroups groups{order.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), 0};
  const BankView bv = bank_view(s, w_up, Tensor());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), "generate_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (s.B > 0) {
      AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "generate_bwd_cuda_ids", [&] {
        const index_t* idp = ids.data_ptr<index_t>();
        launch_shrink<scalar_t, index_t>(pooled, idp, w_down, b_down, bv, z, stream);
        backward_request_kernel<scalar_t, index_t><<<s.B, kThreads, 2 * s.r * sizeof(acc_t), stream>>>(
            z.data_ptr<acc_t>(), idp, grad.data_ptr<scalar_t>(), w_down.data_ptr<scalar_t>(),
            rat_num.data_ptr<scalar_t>(), rat_den.data_ptr<scalar_t>(), w_up.data_ptr<scalar_t>(),
            bv, h.data_ptr<acc_t>(), gz.data_ptr<acc_t>(), gc.data_ptr<acc_t>(),
            g_pooled.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (s.N == 0) return;
    if (s.D > 0) {
      backward_up_kernel<scalar_t><<<dim3(s.N, (s.D + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), h.data_ptr<acc_t>(), bv, groups, g_wu.data_ptr<scalar_t>(),
          g_bu.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t dr_blocks = std::max<int64_t>(1, (s.d * s.r + kThreads - 1) / kThreads);
    backward_down_kernel<scalar_t><<<dim3(s.N, dr_blocks), kThreads, 0, stream>>>(
        pooled.data_ptr<scalar_t>(), gz.data_ptr<acc_t>(), gc.data_ptr<acc_t>(), bv, groups,
        g_wd.data_ptr<scalar_t>(), g_bd.data_ptr<scalar_t>(), g_num.data_ptr<scalar_t>(),
        g_den.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_pooled, g_wd, g_bd, g_num, g_den, g_wu, g_bu};
}

Tensor modulate_cuda(const Tensor& x_in, const Tensor& vectors_in,
                     const std::optional<Tensor>& seq_ids) {
  const char* op = "pedro_ext.modulate";
  const ModulateSizes s = check_modulate_args(op, x_in, vectors_in, seq_ids);
  c10::cuda::CUDAGuard guard(x_in.device());
  if (seq_ids.has_value()) maybe_check_range(op, "seq_ids", *seq_ids, 0, s.B);
  const Tensor x = x_in.contiguous();
  const Tensor v = last_dim_contiguous(vectors_in);
  Tensor y = at::empty_like(x);
  if (s.S == 0 || s.D == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modulate_cuda", [&] {
    const int64_t chunk = 32 * Pack<scalar_t>::kSize * 4;
    const int64_t units = s.S * ((s.D + chunk - 1) / chunk);
    const unsigned int blocks = blocks_for(units, kWarps);
    auto stream = at::cuda::getCurrentCUDAStream();
    auto launch = [&](auto* seq) {
      using I = std::remove_const_t<std::remove_pointer_t<decltype(seq)>>;
      modulate_kernel<scalar_t, I><<<blocks, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), v.stride(0), y.data_ptr<scalar_t>(),
          seq, s.S, s.D, s.B, s.T, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (!seq_ids.has_value()) {
      launch(static_cast<const int64_t*>(nullptr));
    } else {
      const Tensor ids = seq_ids->contiguous();
      AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "modulate_cuda_ids",
                              [&] { launch(ids.data_ptr<index_t>()); });
    }
  });
  return y;
}

Tensor modulate_backward_vectors_cuda(const Tensor& grad_in, const Tensor& x_in,
                                      const std::optional<Tensor>& seq_ids, int64_t num_seqs) {
  const char* op = "pedro_ext.modulate_backward_vectors";
  check_same_shape(op, "grad", grad_in, x_in, "x");
  TORCH_CHECK_VALUE(num_seqs >= 0, op, ": num_seqs must be >= 0, got ", num_seqs);
  const ModulateSizes s = check_modulate_layout(op, x_in, num_seqs, x_in.size(-1), seq_ids);
  c10::cuda::CUDAGuard guard(x_in.device());
  if (seq_ids.has_value()) maybe_check_range(op, "seq_ids", *seq_ids, 0, s.B);
  const Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  Tensor out = at::empty({s.B, s.D}, x.options());
  if (s.B == 0 || s.D == 0) return out;
  RowGroups rows{nullptr, nullptr, s.T};
  Tensor order, starts;
  if (seq_ids.has_value()) {
    std::tie(order, starts) = group_rows(*seq_ids, s.B);
    rows.order = order.data_ptr<int64_t>();
    rows.starts = starts.data_ptr<int64_t>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modulate_bwd_cuda", [&] {
    constexpr int V = Pack<scalar_t>::kSize;
    const bool vec_ok = s.D % V == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(grad.data_ptr()) % 16 == 0;
    const dim3 grid(s.B, (s.D + kThreads * V - 1) / (kThreads * V));
    modulate_backward_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), s.D, rows,
        vec_ok);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(pedro_ext, CUDA, m) {
  m.impl("rational", &rational_cuda);
  m.impl("rational_backward", &rational_backward_cuda);
  m.impl("generate", &generate_cuda);
  m.impl("generate_backward", &generate_backward_cuda);
  m.impl("modulate", &modulate_cuda);
  m.impl("modulate_backward_vectors", &modulate_backward_vectors_cuda);
  m.impl("generate_and_modulate", &generate_and_modulate_cuda);
}

}  // namespace pedro_ext
