// CUDA kernels of the vector generator: rational, generate, the fused prefill and their backward.
// No host syncs except the optional id range check (see maybe_check_ranges).
//
//   generate:               shrink (z = pooled @ w_down + b_down, one block per request)
//                           + expand (1 + R(z) @ w_up + b_up, one block per 256 columns)
//   generate_and_modulate:  the same shrink + one expand launch that also scales the request's
//                           tokens with the freshly computed tile (the fused prefill); a
//                           request's rows are split over gridDim.z blocks, so B = 1 fills the GPU
//   backward:               per-request kernel, then per-adapter kernels that sum the
//                           requests of each adapter in a fixed (stable-sorted) order
// Every reduction has a partition that depends on the sizes only: bitwise the same on any GPU.
#include <torch/library.h>

#include "../rational.h"
#include "common.cuh"

namespace pedro_ext {
namespace cuda_kernels {
namespace {

constexpr int kTile = kThreads;  // vector columns per expand block
constexpr int64_t kMaxRankCuda = 1024;
constexpr int kMaxCoefCuda = 32;
constexpr int64_t kRationalBlocks = 1024;  // fixed: the coefficient sums' partition
constexpr int64_t kMaxRowSplits = 64;

// ---------------------------------------------------------------- rational ------------
template <typename T>
__global__ void rational_kernel(const T* x, T* y, int64_t n, const T* num, int nl, const T* den,
                                int dl) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t cn[kMaxCoefCuda], cd[kMaxCoefCuda];
  __shared__ RationalCoefs<acc_t, acc_t> shared_coefs;
  if (threadIdx.x < nl) cn[threadIdx.x] = to_acc(num[threadIdx.x]);
  if (threadIdx.x < dl) cd[threadIdx.x] = to_acc(den[threadIdx.x]);
  __syncthreads();
  if (threadIdx.x == 0) shared_coefs = rational_coefs<acc_t>(cn, nl, cd, dl);
  __syncthreads();
  const auto coefs = shared_coefs;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    y[i] = static_cast<T>(rational_value(to_acc(x[i]), coefs));
}

// Block j writes its coefficient-gradient sums to partial[j]; sum_splits_kernel adds them in
// block order. The grid has min(ceil(n / 256), kRationalBlocks) blocks on every GPU.
template <typename T>
__global__ void rational_backward_kernel(const T* grad, const T* x, T* grad_x, int64_t n,
                                         const T* num, int nl, const T* den, int dl,
                                         at::opmath_type<T>* partial) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t cn[kMaxCoefCuda], cd[kMaxCoefCuda];
  __shared__ acc_t red[kWarps][2 * kMaxCoefCuda];
  __shared__ RationalCoefs<acc_t, acc_t> shared_coefs;
  if (threadIdx.x < nl) cn[threadIdx.x] = to_acc(num[threadIdx.x]);
  if (threadIdx.x < dl) cd[threadIdx.x] = to_acc(den[threadIdx.x]);
  __syncthreads();
  if (threadIdx.x == 0) shared_coefs = rational_coefs<acc_t>(cn, nl, cd, dl);
  __syncthreads();
  const auto coefs = shared_coefs;
  acc_t gc[2 * kMaxCoefCuda];
  for (int c = 0; c < nl + dl; ++c) gc[c] = acc_t(0);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const acc_t z = to_acc(x[i]);
    const acc_t g = to_acc(grad[i]);
    const auto t = rational_terms(z, coefs);
    grad_x[i] = static_cast<T>(g * rational_dz(t));
    rational_coef_grads_accumulate(g, t, z, coefs, gc, gc + nl);
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
    partial[blockIdx.x * (int64_t)(nl + dl) + threadIdx.x] = s;
  }
}

// ---------------------------------------------------------------- generate ------------
struct BankView {  // element strides of the adapter bank, as passed in (slices allowed)
  int64_t N, d, r, D, nl, dl;
  int64_t wu_s0, wu_s1, bu_s0;
};

// z[b, k] = pooled[b] @ w_down[a, :, k] + b_down[a, k]; one block per request. The columns are
// taken 32 at a time; a warp reads 32 / kc consecutive rows of those kc columns per step (one
// contiguous stretch of w_down when r <= 32), warp w the rows w * rpw + 8 * rpw * j + sub, and
// the per-thread sums are added in a fixed order. Rows with no adapter get 0, invalid ones NaN.
template <typename T, typename I>
__global__ void shrink_kernel(const T* pooled, const I* ids, const T* wd, const T* bd,
                              BankView bv, at::opmath_type<T>* z) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t part[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t a = static_cast<int64_t>(ids[b]);
  acc_t* zb = z + b * bv.r;
  if (a < 0 || a >= bv.N) {  // uniform over the block
    const acc_t fill = a == -1 ? acc_t(0) : static_cast<acc_t>(NAN);
    for (int64_t k = threadIdx.x; k < bv.r; k += blockDim.x) zb[k] = fill;
    return;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* p = pooled + b * bv.d;
  const T* w = wd + a * bv.d * bv.r;
  for (int64_t k0 = 0; k0 < bv.r; k0 += 32) {
    const int kc = static_cast<int>(min((int64_t)32, bv.r - k0));
    const int rpw = 32 / kc;
    const int sub = lane / kc, kk = lane % kc;
    acc_t s = 0;
    if (sub < rpw) {
      for (int64_t i = (int64_t)warp * rpw + sub; i < bv.d; i += (int64_t)kWarps * rpw)
        s += to_acc(p[i]) * to_acc(w[i * bv.r + k0 + kk]);
    }
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x < kc) {
      acc_t t = 0;
      for (int wi = 0; wi < kWarps; ++wi)
        for (int j = 0; j < rpw; ++j) t += part[wi * 32 + j * kc + threadIdx.x];
      zb[k0 + threadIdx.x] = t + to_acc(bd[a * bv.r + k0 + threadIdx.x]);
    }
    __syncthreads();
  }
}

// v[b, c] = 1 + R(z[b]) @ w_up[a, :, c] + b_up[a, c] for one 256-column tile (stored by the
// blocks with blockIdx.z == 0). With kModulate the tile then scales rows z, z + gridDim.z, ...
// (in units of 8 rows, one per warp) of request b: y = x * v (the fused prefill path); rows
// whose seq id is invalid get NaN (blocks of request 0).
template <typename T, typename I, bool kModulate>
__global__ void expand_kernel(const at::opmath_type<T>* z, const I* ids, const T* num,
                              const T* den, const T* wu, const T* bu, BankView bv, T* vectors,
                              const T* x, int64_t xs, T* y, RowGroups rows) {
  using acc_t = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];  // read as acc_t (double)
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
    if (threadIdx.x < bv.r) {  // (only the threads that evaluate the unit prepare it)
      const auto coefs = rational_coefs<acc_t>(cn, (int)bv.nl, cd, (int)bv.dl);
      for (int64_t k = threadIdx.x; k < bv.r; k += blockDim.x)
        h[k] = rational_value(z[b * bv.r + k], coefs);
    }
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
      acc_t s = to_acc(bu[a * bv.bu_s0 + col]);
      for (int64_t k = 0; k < bv.r; ++k) s += h[k] * to_acc(w[k * bv.wu_s1]);
      v = static_cast<T>(acc_t(1) + s);
    }
    if (blockIdx.z == 0) vectors[b * bv.D + col] = v;
    if (kModulate) vtile[threadIdx.x] = v;
  }
  if (kModulate) {
    __syncthreads();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t first = (int64_t)blockIdx.z * kWarps + warp;
    const int64_t step = (int64_t)gridDim.z * kWarps;
    for (int64_t q = rows.begin(b) + first; q < rows.end(b); q += step) {
      const int64_t row = rows.row(q);
      scale_span(y + row * bv.D + c0, x + row * xs + c0, vtile, ncols, lane);
    }
    if (rows.order && b == 0) {
      for (int64_t q = first; q < rows.starts[0]; q += step)
        fill_span(y + rows.order[q] * bv.D + c0, ncols, nan_value<T>(), lane);
      for (int64_t q = rows.starts[rows.groups] + first; q < rows.total; q += step)
        fill_span(y + rows.order[q] * bv.D + c0, ncols, nan_value<T>(), lane);
    }
  }
}

// ---------------------------------------------------------------- generate backward ---
// Per request: h = R(z), gh = w_up[a] @ g, gz = gh * R'(z), the coefficient grads of this
// request (each thread its k's, then a fixed-order block sum), grad_pooled = w_down[a] @ gz.
// One block per request; requests with no or an invalid adapter contribute nothing.
template <typename T, typename I>
__global__ void backward_request_kernel(const at::opmath_type<T>* z, const I* ids, const T* grad,
                                        const T* wd, const T* num, const T* den, const T* wu,
                                        BankView bv, at::opmath_type<T>* h_out,
                                        at::opmath_type<T>* gz_out, at::opmath_type<T>* gc_out,
                                        T* grad_pooled) {
  using acc_t = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];  // read as acc_t (double)
  acc_t* gh = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* gz = gh + bv.r;
  __shared__ acc_t red[kWarps][2 * kMaxCoefCuda];
  const int64_t b = blockIdx.x;
  const int64_t a = static_cast<int64_t>(ids[b]);
  const int nl = (int)bv.nl, dl = (int)bv.dl, nc = nl + dl;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (a < 0 || a >= bv.N) {  // uniform over the block
    for (int64_t i = threadIdx.x; i < bv.d; i += blockDim.x) grad_pooled[b * bv.d + i] = T(0);
    for (int64_t k = threadIdx.x; k < bv.r; k += blockDim.x)
      h_out[b * bv.r + k] = gz_out[b * bv.r + k] = 0;
    for (int c = threadIdx.x; c < nc; c += blockDim.x) gc_out[b * nc + c] = 0;
    return;
  }
  const T* g = grad + b * bv.D;
  for (int64_t k = warp; k < bv.r; k += kWarps) {
    const T* w = wu + a * bv.wu_s0 + k * bv.wu_s1;
    acc_t s = 0;
    for (int64_t j = lane; j < bv.D; j += 32) s += to_acc(w[j]) * to_acc(g[j]);
    s = warp_sum(s);
    if (lane == 0) gh[k] = s;
  }
  __syncthreads();
  const T* cn = num + a * bv.nl;
  const T* cd = den + a * bv.dl;
  acc_t gc[2 * kMaxCoefCuda];
  for (int c = 0; c < nc; ++c) gc[c] = acc_t(0);
  if (threadIdx.x < bv.r) {  // (only the threads that evaluate the unit prepare it)
    const auto coefs = rational_coefs<acc_t>(cn, nl, cd, dl);
    for (int64_t k = threadIdx.x; k < bv.r; k += blockDim.x) {
      const acc_t zk = z[b * bv.r + k];
      const auto t = rational_terms(zk, coefs);
      h_out[b * bv.r + k] = rational_of(t);
      gz[k] = gh[k] * rational_dz(t);
      gz_out[b * bv.r + k] = gz[k];
      rational_coef_grads_accumulate(gh[k], t, zk, coefs, gc, gc + nl);
    }
  }
  for (int c = 0; c < nc; ++c) {
    const acc_t s = warp_sum(gc[c]);
    if (lane == 0) red[warp][c] = s;
  }
  __syncthreads();
  if (threadIdx.x < nc) {
    acc_t s = 0;
    for (int w = 0; w < kWarps; ++w) s += red[w][threadIdx.x];
    gc_out[b * nc + threadIdx.x] = s;
  }
  const T* w = wd + a * bv.d * bv.r;
  for (int64_t i = threadIdx.x; i < bv.d; i += blockDim.x) {
    acc_t s = 0;
    for (int64_t k = 0; k < bv.r; ++k) s += to_acc(w[i * bv.r + k]) * gz[k];
    grad_pooled[b * bv.d + i] = static_cast<T>(s);
  }
}

// grad_w_up[n, k, c] and grad_b_up[n, c]: one thread per column c of adapter n (columns
// strided over gridDim.y blocks).
template <typename T>
__global__ void backward_up_kernel(const T* grad, const at::opmath_type<T>* h, BankView bv,
                                   RowGroups groups, T* g_wu, T* g_bu) {
  using acc_t = at::opmath_type<T>;
  const int64_t n = blockIdx.x;
  const int64_t q0 = groups.begin(n), q1 = groups.end(n);
  for (int64_t c = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; c < bv.D;
       c += (int64_t)gridDim.y * blockDim.x) {
    acc_t sb = 0;
    for (int64_t q = q0; q < q1; ++q) sb += to_acc(grad[groups.row(q) * bv.D + c]);
    g_bu[n * bv.D + c] = static_cast<T>(sb);
    for (int64_t k = 0; k < bv.r; ++k) {
      acc_t s = 0;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t b = groups.row(q);
        s += h[b * bv.r + k] * to_acc(grad[b * bv.D + c]);
      }
      g_wu[(n * bv.r + k) * bv.D + c] = static_cast<T>(s);
    }
  }
}

// grad_w_down[n, i, k] (one thread per element, strided over gridDim.y blocks), and from the
// blocks with blockIdx.y == 0 grad_b_down[n] and the coefficient grads of adapter n.
template <typename T>
__global__ void backward_down_kernel(const T* pooled, const at::opmath_type<T>* gz,
                                     const at::opmath_type<T>* gc, BankView bv, RowGroups groups,
                                     T* g_wd, T* g_bd, T* g_num, T* g_den) {
  using acc_t = at::opmath_type<T>;
  const int64_t n = blockIdx.x;
  const int64_t q0 = groups.begin(n), q1 = groups.end(n);
  const int64_t dr = bv.d * bv.r;
  for (int64_t e = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; e < dr;
       e += (int64_t)gridDim.y * blockDim.x) {
    const int64_t i = e / bv.r, k = e % bv.r;
    acc_t s = 0;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b = groups.row(q);
      s += to_acc(pooled[b * bv.d + i]) * gz[b * bv.r + k];
    }
    g_wd[n * dr + e] = static_cast<T>(s);
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
void check_cuda_limits(const char* op, const GenerateSizes& s) {
  TORCH_CHECK_VALUE(s.r <= kMaxRankCuda, op, ": r = ", s.r, " exceeds the CUDA kernels' limit of ",
                    kMaxRankCuda);
  TORCH_CHECK_VALUE(s.num_len <= kMaxCoefCuda && s.den_len <= kMaxCoefCuda, op,
                    ": the CUDA kernels support up to ", kMaxCoefCuda,
                    " coefficients in rat_num and rat_den, got ", s.num_len, " and ", s.den_len);
}

BankView bank_view(const GenerateSizes& s, const Tensor& w_up, const Tensor& b_up) {
  return BankView{s.N, s.d, s.r, s.D, s.num_len, s.den_len, w_up.stride(0), w_up.stride(1),
                  b_up.defined() ? b_up.stride(0) : 0};
}

// z = pooled @ w_down[ids] + b_down[ids] in acc precision (both generate and its backward).
template <typename T, typename I>
void launch_shrink(const char* op, const Tensor& pooled, const I* ids, const Tensor& w_down,
                   const Tensor& b_down, const BankView& bv, Tensor& z, cudaStream_t stream) {
  if (bv.r == 0 || pooled.size(0) == 0) return;
  shrink_kernel<T, I><<<checked_grid(op, pooled.size(0)), kThreads, 0, stream>>>(
      pooled.data_ptr<T>(), ids, w_down.data_ptr<T>(), b_down.data_ptr<T>(), bv,
      z.data_ptr<at::opmath_type<T>>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// How many blocks share one request's rows in the fused prefill: enough for ~4 blocks per SM
// in total, at least 8 rows (one per warp) per block. Only the speed depends on it.
int64_t prefill_row_splits(const ModulateSizes& ms, int64_t tiles) {
  const int64_t rows_per_request = ms.B > 0 ? ceil_div(ms.S, ms.B) : 0;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = ceil_div(4 * sms, std::max<int64_t>(1, ms.B * tiles));
  return std::clamp<int64_t>(std::min(want, ceil_div(rows_per_request, kWarps)), 1,
                             kMaxRowSplits);
}

// Shared by generate and generate_and_modulate: checks, shrink, expand (optionally fused).
std::tuple<Tensor, Tensor> generate_cuda_impl(const char* op, const Tensor* x_in,
                                              const std::optional<Tensor>& seq_ids,
                                              const Tensor& pooled_in, const Tensor& adapter_ids,
                                              const Tensor& w_down_in, const Tensor& b_down_in,
                                              const Tensor& rat_num_in, const Tensor& rat_den_in,
                                              const Tensor& w_up_in, const Tensor& b_up_in,
                                              bool check_ids) {
  const GenerateSizes s = check_generate_args(op, pooled_in, adapter_ids, w_down_in, b_down_in,
                                              rat_num_in, rat_den_in, w_up_in, b_up_in);
  check_cuda_limits(op, s);
  ModulateSizes ms{0, s.D, s.B, 0};
  if (x_in) {
    check_like(op, "x", *x_in, pooled_in, "pooled");
    ms = check_modulate_layout(op, *x_in, s.B, s.D, seq_ids, "x",
                               "the number of sequences B (pooled.size(0))",
                               "the vector width D (w_up.size(2))");
  }
  c10::cuda::CUDAGuard guard(pooled_in.device());
  if (x_in && seq_ids.has_value()) {
    maybe_check_ranges(op, check_ids,
                       {{"adapter_ids", &adapter_ids, -1, s.N}, {"seq_ids", &*seq_ids, 0, s.B}});
  } else {
    maybe_check_ranges(op, check_ids, {{"adapter_ids", &adapter_ids, -1, s.N}});
  }
  const Tensor pooled = pooled_in.contiguous(), w_down = w_down_in.contiguous(),
               b_down = b_down_in.contiguous(), rat_num = rat_num_in.contiguous(),
               rat_den = rat_den_in.contiguous(), w_up = last_dim_contiguous(w_up_in),
               b_up = last_dim_contiguous(b_up_in), ids = adapter_ids.contiguous();
  Tensor vectors = at::empty({s.B, s.D}, pooled.options());
  Tensor x, y;
  if (x_in) {
    x = rows_view(*x_in);
    y = at::empty(x_in->sizes(), x_in->options());
  }
  if (s.B == 0 || s.D == 0) {
    if (x_in && ms.S > 0 && s.D > 0) y.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, vectors};  // B == 0 with packed rows: every seq id is invalid
  }
  std::tuple<Tensor, Tensor> keep;
  const RowGroups rows = x_in ? row_groups(ms, seq_ids, keep) : RowGroups{nullptr, nullptr, 0, 0, 0};
  Tensor z = acc_empty(pooled, {s.B, s.r});
  const BankView bv = bank_view(s, w_up, b_up);
  const int64_t tiles = ceil_div(s.D, kTile);
  const int64_t splits = x_in ? prefill_row_splits(ms, tiles) : 1;
  const dim3 grid = checked_grid(op, s.B, tiles, splits);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), "generate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "generate_cuda_ids", [&] {
      const index_t* idp = ids.data_ptr<index_t>();
      launch_shrink<scalar_t, index_t>(op, pooled, idp, w_down, b_down, bv, z, stream);
      const size_t smem = s.r * sizeof(acc_t);
      auto launch = [&](auto kernel, const scalar_t* xp, int64_t xs, scalar_t* yp) {
        kernel<<<grid, kThreads, smem, stream>>>(
            z.data_ptr<acc_t>(), idp, rat_num.data_ptr<scalar_t>(), rat_den.data_ptr<scalar_t>(),
            w_up.data_ptr<scalar_t>(), b_up.data_ptr<scalar_t>(), bv,
            vectors.data_ptr<scalar_t>(), xp, xs, yp, rows);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (x_in) {
        launch(expand_kernel<scalar_t, index_t, true>, x.data_ptr<scalar_t>(), row_stride(x),
               y.data_ptr<scalar_t>());
      } else {
        launch(expand_kernel<scalar_t, index_t, false>, nullptr, 0, nullptr);
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
  Tensor coef = at::zeros({nl + dl}, x.options());
  if (x.numel() > 0) {
    const int64_t blocks = std::min(ceil_div(x.numel(), kThreads), kRationalBlocks);
    Tensor partial = acc_empty(x, {blocks, nl + dl});
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rational_bwd_cuda", [&] {
      rational_backward_kernel<scalar_t><<<checked_grid(op, blocks), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
          x.numel(), num.data_ptr<scalar_t>(), nl, den.data_ptr<scalar_t>(), dl,
          partial.data_ptr<at::opmath_type<scalar_t>>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_sum_splits<scalar_t>(partial, blocks, coef, stream);
    });
  }
  return {grad_x.view(x_in.sizes()), coef.slice(0, 0, nl).clone(), coef.slice(0, nl).clone()};
}

Tensor generate_cuda(const Tensor& pooled, const Tensor& adapter_ids, const Tensor& w_down,
                     const Tensor& b_down, const Tensor& rat_num, const Tensor& rat_den,
                     const Tensor& w_up, const Tensor& b_up, bool check_ids) {
  return std::get<1>(generate_cuda_impl("pedro_ext.generate", nullptr, std::nullopt, pooled,
                                        adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up,
                                        check_ids));
}

std::tuple<Tensor, Tensor> generate_and_modulate_cuda(
    const Tensor& x, const std::optional<Tensor>& seq_ids, const Tensor& pooled,
    const Tensor& adapter_ids, const Tensor& w_down, const Tensor& b_down, const Tensor& rat_num,
    const Tensor& rat_den, const Tensor& w_up, const Tensor& b_up, bool check_ids) {
  return generate_cuda_impl("pedro_ext.generate_and_modulate", &x, seq_ids, pooled, adapter_ids,
                            w_down, b_down, rat_num, rat_den, w_up, b_up, check_ids);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> generate_backward_cuda(
    const Tensor& grad_in, const Tensor& pooled_in, const Tensor& adapter_ids,
    const Tensor& w_down_in, const Tensor& b_down_in, const Tensor& rat_num_in,
    const Tensor& rat_den_in, const Tensor& w_up_in) {
  const char* op = "pedro_ext.generate_backward";
  const GenerateSizes s = check_generate_args(op, pooled_in, adapter_ids, w_down_in, b_down_in,
                                              rat_num_in, rat_den_in, w_up_in, std::nullopt);
  check_cuda_limits(op, s);
  check_generate_grad(op, grad_in, pooled_in, s);
  c10::cuda::CUDAGuard guard(pooled_in.device());
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
  const RowGroups groups{order.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), 0, s.N, s.B};
  const BankView bv = bank_view(s, w_up, Tensor());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), "generate_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (s.B > 0) {
      AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "generate_bwd_cuda_ids", [&] {
        const index_t* idp = ids.data_ptr<index_t>();
        launch_shrink<scalar_t, index_t>(op, pooled, idp, w_down, b_down, bv, z, stream);
        backward_request_kernel<scalar_t, index_t>
            <<<checked_grid(op, s.B), kThreads, 2 * s.r * sizeof(acc_t), stream>>>(
                z.data_ptr<acc_t>(), idp, grad.data_ptr<scalar_t>(), w_down.data_ptr<scalar_t>(),
                rat_num.data_ptr<scalar_t>(), rat_den.data_ptr<scalar_t>(),
                w_up.data_ptr<scalar_t>(), bv, h.data_ptr<acc_t>(), gz.data_ptr<acc_t>(),
                gc.data_ptr<acc_t>(), g_pooled.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (s.N == 0) return;
    if (s.D > 0) {
      const dim3 grid = checked_grid(op, s.N, std::min(ceil_div(s.D, kThreads), kMaxGridYZ));
      backward_up_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), h.data_ptr<acc_t>(), bv, groups, g_wu.data_ptr<scalar_t>(),
          g_bu.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t dr_blocks = std::max<int64_t>(1, ceil_div(s.d * s.r, kThreads));
    backward_down_kernel<scalar_t>
        <<<checked_grid(op, s.N, std::min(dr_blocks, kMaxGridYZ)), kThreads, 0, stream>>>(
            pooled.data_ptr<scalar_t>(), gz.data_ptr<acc_t>(), gc.data_ptr<acc_t>(), bv, groups,
            g_wd.data_ptr<scalar_t>(), g_bd.data_ptr<scalar_t>(), g_num.data_ptr<scalar_t>(),
            g_den.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_pooled, g_wd, g_bd, g_num, g_den, g_wu, g_bu};
}

TORCH_LIBRARY_IMPL(pedro_ext, CUDA, m) {
  m.impl("rational", &rational_cuda);
  m.impl("rational_backward", &rational_backward_cuda);
  m.impl("generate", &generate_cuda);
  m.impl("generate_backward", &generate_backward_cuda);
  m.impl("generate_and_modulate", &generate_and_modulate_cuda);
}

}  // namespace cuda_kernels
}  // namespace pedro_ext
