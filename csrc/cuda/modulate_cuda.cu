// CUDA kernels of the per-token ops: modulate, modulate_, act_mul_modulate and their backward.
//   forward:   one warp per (row, chunk of 4 x 32 x 16 bytes), 16-byte loads/stores where the
//              row's pointers share their alignment, scalar otherwise; rows may be strided
//   backward:  elementwise kernels for the inputs; the per-request vector gradient is a fixed-
//              order reduction (see request_sum_kernel), so it is bitwise reproducible on any GPU
#include <c10/cuda/CUDAMathCompat.h>
#include <torch/library.h>

#include <type_traits>

#include "../activations.h"
#include "common.cuh"

namespace pedro_ext {
namespace cuda_kernels {
namespace {

// act(g) with the very expressions of torch's eager CUDA kernels (ATen/native/cuda/
// ActivationSiluKernel.cu and ActivationGeluKernel.cu, tanh case) in opmath, so nvcc emits the
// same operations and act_mul_modulate with vectors of ones is bitwise F.silu(g) * u.
template <Activation A, typename opmath_t>
__device__ __forceinline__ opmath_t torch_act(opmath_t x) {
  if constexpr (A == Activation::kSilu) {
    return x / (opmath_t(1) + c10::cuda::compat::exp(-x));
  } else {
    constexpr opmath_t kBeta = M_SQRT2 * M_2_SQRTPI * opmath_t(0.5);
    constexpr opmath_t kKappa = 0.044715;
    const opmath_t x_cube = x * x * x;
    const opmath_t inner = kBeta * (x + kKappa * x_cube);
    return opmath_t(0.5) * x * (opmath_t(1) + c10::cuda::compat::tanh(inner));
  }
}

// y = round(round(round(act(g)) * u) * v) over one span, rounding to T as eager torch's act and
// two multiplications would (no-ops for float and double); as scale_span otherwise.
template <Activation A, typename T>
__device__ void act_mul_span(T* y, const T* g, const T* u, const T* v, int64_t n, int lane) {
  using P = Pack<T>;
  using acc_t = at::opmath_type<T>;
  constexpr int V = P::kSize;
  const unsigned ag = misalignment(g);
  const int64_t head = aligned_head<T>(
      n, ag, ag == misalignment(y) && ag == misalignment(u) && ag == misalignment(v));
  auto f = [](T gv, T uv, T vv) {
    const T act = static_cast<T>(torch_act<A, acc_t>(to_acc(gv)));
    const T act_up = static_cast<T>(to_acc(act) * to_acc(uv));
    return static_cast<T>(to_acc(act_up) * to_acc(vv));
  };
  for (int64_t j = lane; j < head; j += 32) y[j] = f(g[j], u[j], v[j]);
  const int64_t nvec = (n - head) / V;
  const P* gv = reinterpret_cast<const P*>(g + head);
  const P* uv = reinterpret_cast<const P*>(u + head);
  const P* vv = reinterpret_cast<const P*>(v + head);
  P* yv = reinterpret_cast<P*>(y + head);
  for (int64_t i = lane; i < nvec; i += 32) {
    const P a = gv[i], b = uv[i], c = vv[i];
    P o;
#pragma unroll
    for (int e = 0; e < V; ++e) o.v[e] = f(a.v[e], b.v[e], c.v[e]);
    yv[i] = o;
  }
  for (int64_t j = head + nvec * V + lane; j < n; j += 32) y[j] = f(g[j], u[j], v[j]);
}

template <typename I>
__device__ __forceinline__ int64_t request_of(const I* seq_ids, int64_t row,
                                              const ModulateSizes& s) {
  return seq_ids ? static_cast<int64_t>(seq_ids[row]) : row / s.T;
}

// Warp-level work units: (row, chunk of `chunk` columns).
struct Units {
  int64_t chunk, chunks, total;
  __device__ int64_t first() const {
    return (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  }
  __device__ int64_t step() const { return (int64_t)gridDim.x * blockDim.x / 32; }
};

// y[row] = x[row] * v[request of row]; rows with an invalid seq id get `invalid`. y may be x.
template <typename T, typename I>
__global__ void modulate_kernel(const T* x, int64_t xs, const T* v, int64_t vs, T* y, int64_t ys,
                                const I* seq_ids, ModulateSizes s, Units units, T invalid) {
  const int lane = threadIdx.x % 32;
  for (int64_t u = units.first(); u < units.total; u += units.step()) {
    const int64_t row = u / units.chunks, c0 = (u % units.chunks) * units.chunk;
    const int64_t n = min(units.chunk, s.D - c0);
    const int64_t b = request_of(seq_ids, row, s);
    T* yr = y + row * ys + c0;
    if (b < 0 || b >= s.B) {
      fill_span(yr, n, invalid, lane);
    } else {
      scale_span(yr, x + row * xs + c0, v + b * vs + c0, n, lane);
    }
  }
}

template <Activation A, typename T, typename I>
__global__ void act_mul_kernel(const T* g, int64_t gs, const T* u, int64_t us, const T* v,
                               int64_t vs, T* y, const I* seq_ids, ModulateSizes s, Units units) {
  const int lane = threadIdx.x % 32;
  for (int64_t w = units.first(); w < units.total; w += units.step()) {
    const int64_t row = w / units.chunks, c0 = (w % units.chunks) * units.chunk;
    const int64_t n = min(units.chunk, s.D - c0);
    const int64_t b = request_of(seq_ids, row, s);
    T* yr = y + row * s.D + c0;
    if (b < 0 || b >= s.B) {
      fill_span(yr, n, nan_value<T>(), lane);
    } else {
      act_mul_span<A>(yr, g + row * gs + c0, u + row * us + c0, v + b * vs + c0, n, lane);
    }
  }
}

// grad_gate = grad v u act'(g), grad_up = grad v act(g); zero on rows with an invalid seq id.
template <Activation A, typename T, typename I>
__global__ void act_mul_backward_kernel(const T* grad, const T* g, int64_t gs, const T* u,
                                        int64_t us, const T* v, int64_t vs, T* g_gate, T* g_up,
                                        const I* seq_ids, ModulateSizes s) {
  using acc_t = at::opmath_type<T>;
  const int64_t n = s.S * s.D;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = e / s.D, c = e % s.D;
    const int64_t b = request_of(seq_ids, row, s);
    if (b < 0 || b >= s.B) {
      g_gate[e] = T(0);
      g_up[e] = T(0);
      continue;
    }
    const auto t = act_terms<A, acc_t>(to_acc(g[row * gs + c]));
    const acc_t dv = to_acc(grad[e]) * to_acc(v[b * vs + c]);
    g_gate[e] = static_cast<T>(dv * to_acc(u[row * us + c]) * t.grad);
    g_up[e] = static_cast<T>(dv * t.value);
  }
}

// Per-element terms of the vector gradients, summed over a request's rows by request_sum_kernel.
// add(row, c, acc) adds the terms of columns c .. c+V-1 (those < D) of one row; with `vec`
// (every base pointer 16-byte aligned, D and the row strides multiples of V) in one 16-byte load
// per operand.
template <typename T>
struct ModulateTerm {  // grad * x
  const T* grad;
  const T* x;
  int64_t xs, D;
  bool vec;
  __device__ void add(int64_t row, int64_t c, at::opmath_type<T>* acc) const {
    using P = Pack<T>;
    constexpr int V = P::kSize;
    const T* gr = grad + row * D + c;
    const T* xr = x + row * xs + c;
    if (vec && c + V <= D) {
      const P a = *reinterpret_cast<const P*>(gr), b = *reinterpret_cast<const P*>(xr);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] += to_acc(a.v[e]) * to_acc(b.v[e]);
    } else {
      for (int e = 0; e < V && c + e < D; ++e) acc[e] += to_acc(gr[e]) * to_acc(xr[e]);
    }
  }
};

template <Activation A, typename T>
struct ActMulTerm {  // grad * act(gate) * up
  const T* grad;
  const T* g;
  const T* u;
  int64_t gs, us, D;
  bool vec;
  __device__ void add(int64_t row, int64_t c, at::opmath_type<T>* acc) const {
    using P = Pack<T>;
    using acc_t = at::opmath_type<T>;
    constexpr int V = P::kSize;
    const T* dr = grad + row * D + c;
    const T* gr = g + row * gs + c;
    const T* ur = u + row * us + c;
    if (vec && c + V <= D) {
      const P a = *reinterpret_cast<const P*>(dr), b = *reinterpret_cast<const P*>(gr),
              d = *reinterpret_cast<const P*>(ur);
#pragma unroll
      for (int e = 0; e < V; ++e)
        acc[e] += to_acc(a.v[e]) * act_value<A, acc_t>(to_acc(b.v[e])) * to_acc(d.v[e]);
    } else {
      for (int e = 0; e < V && c + e < D; ++e)
        acc[e] += to_acc(dr[e]) * act_value<A, acc_t>(to_acc(gr[e])) * to_acc(ur[e]);
    }
  }
};

// partial[z, b, c] = sum of term(row, c) over the z-th of gridDim.z equal shares of request b's
// rows. Block (b, y, z) takes the 32 V-column tiles y, y + gridDim.y, ... (any D fits the grid);
// in a tile lane l owns columns l V .. l V + V - 1, warp w the rows w, w + 8, ... of the share,
// and the 8 warp sums are added in warp order. The partition depends on the sizes only, so the
// result is the same on every run and every GPU.
template <typename T, typename Term>
__global__ void request_sum_kernel(Term term, RowGroups rows, int64_t D,
                                   at::opmath_type<T>* partial) {
  using acc_t = at::opmath_type<T>;
  constexpr int V = Pack<T>::kSize;
  constexpr int kTileCols = 32 * V;
  // red[w][e * 32 + l] holds column l V + e of warp w: lanes store to (and threads read from)
  // consecutive words, free of bank conflicts
  __shared__ acc_t red[kWarps][kTileCols];
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t q0 = rows.begin(b), q1 = rows.end(b);
  const int64_t per = (q1 - q0 + gridDim.z - 1) / gridDim.z;
  const int64_t s0 = q0 + (int64_t)blockIdx.z * per;
  const int64_t s1 = min(q1, s0 + per);
  for (int64_t tile0 = (int64_t)blockIdx.y * kTileCols; tile0 < D;
       tile0 += (int64_t)gridDim.y * kTileCols) {  // uniform over the block
    acc_t acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = acc_t(0);
    const int64_t c = tile0 + (int64_t)lane * V;
    if (c < D)
      for (int64_t q = s0 + warp; q < s1; q += kWarps) term.add(rows.row(q), c, acc);
#pragma unroll
    for (int e = 0; e < V; ++e) red[warp][e * 32 + lane] = acc[e];
    __syncthreads();
    for (int t = threadIdx.x; t < kTileCols; t += kThreads) {
      acc_t s = 0;
      for (int w = 0; w < kWarps; ++w) s += red[w][t];
      const int64_t col = tile0 + (t % 32) * V + t / 32;
      if (col < D) partial[((int64_t)blockIdx.z * rows.groups + b) * D + col] = s;
    }
    __syncthreads();  // red is rewritten by the next tile
  }
}

// Shares per request: about 64 rows each, at most 64 shares; from the sizes only.
int64_t row_splits(const ModulateSizes& s) {
  const int64_t avg = s.B > 0 ? ceil_div(s.S, s.B) : 0;
  return std::clamp<int64_t>(ceil_div(avg, 64), 1, 64);
}

// out[b] = sum of term over the rows of request b (rows of invalid seq ids: none), rounded to T.
template <typename T, typename Term>
void launch_request_sum(const char* op, const Term& term, const ModulateSizes& s,
                        const std::optional<Tensor>& seq_ids, const Tensor& out,
                        cudaStream_t stream) {
  if (s.B == 0 || s.D == 0) return;
  constexpr int V = Pack<T>::kSize;
  std::tuple<Tensor, Tensor> keep;
  const RowGroups rows = row_groups(s, seq_ids, keep);
  const int64_t splits = row_splits(s);
  const dim3 grid = checked_grid(op, s.B, std::min(ceil_div(s.D, 32 * V), kMaxGridYZ), splits);
  Tensor partial = acc_empty(out, {splits, s.B, s.D});
  request_sum_kernel<T, Term><<<grid, kThreads, 0, stream>>>(term, rows, s.D,
                                                             partial.data_ptr<at::opmath_type<T>>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_sum_splits<T>(partial, splits, out, stream);
}

Units units_for(const ModulateSizes& s, int64_t elem_size) {
  const int64_t chunk = 32 * (16 / elem_size) * 4;
  const int64_t chunks = ceil_div(s.D, chunk);
  return Units{chunk, chunks, s.S * chunks};
}

// Calls f(seq_ids pointer) with the ids' index type, or with a null int64_t pointer (padded).
template <typename F>
void with_seq_ids(const std::optional<Tensor>& seq_ids, Tensor& keep, F f) {
  if (!seq_ids.has_value()) {
    f(static_cast<const int64_t*>(nullptr));
    return;
  }
  keep = seq_ids->contiguous();
  AT_DISPATCH_INDEX_TYPES(keep.scalar_type(), "pedro_seq_ids",
                          [&] { f(static_cast<const index_t*>(keep.data_ptr<index_t>())); });
}

template <typename F>
void with_activation(Activation a, F f) {
  if (a == Activation::kSilu) {
    f(std::integral_constant<Activation, Activation::kSilu>{});
  } else {
    f(std::integral_constant<Activation, Activation::kGeluTanh>{});
  }
}

// y = x * v[request] with `invalid` on invalid rows; y may be x (then ys == xs).
void launch_modulate(const ModulateSizes& s, const Tensor& x, int64_t xs, const Tensor& v,
                     const Tensor& y, int64_t ys, const std::optional<Tensor>& seq_ids,
                     double invalid) {
  if (s.S == 0 || s.D == 0) return;
  Tensor ids;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modulate_cuda", [&] {
    const Units units = units_for(s, sizeof(scalar_t));
    const unsigned int blocks = blocks_for(units.total, kWarps);
    with_seq_ids(seq_ids, ids, [&](auto* seq) {
      using I = std::remove_const_t<std::remove_pointer_t<decltype(seq)>>;
      modulate_kernel<scalar_t, I><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), xs, v.data_ptr<scalar_t>(), v.stride(0), y.data_ptr<scalar_t>(),
          ys, seq, s, units, static_cast<scalar_t>(invalid));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

Tensor modulate_out_of_place(const char* op, const char* x_name, const Tensor& x_in,
                             const Tensor& vectors, const std::optional<Tensor>& seq_ids,
                             bool check_ids, double invalid) {
  const ModulateSizes s = check_modulate_args(op, x_in, vectors, seq_ids, x_name);
  c10::cuda::CUDAGuard guard(x_in.device());
  if (seq_ids.has_value()) maybe_check_ranges(op, check_ids, {{"seq_ids", &*seq_ids, 0, s.B}});
  const Tensor x = rows_view(x_in);
  const Tensor v = last_dim_contiguous(vectors);
  Tensor y = at::empty(x_in.sizes(), x_in.options());
  launch_modulate(s, x, row_stride(x), v, y, s.D, seq_ids, invalid);
  return y;
}

}  // namespace

Tensor modulate_cuda(const Tensor& x, const Tensor& vectors, const std::optional<Tensor>& seq_ids,
                     bool check_ids) {
  return modulate_out_of_place("pedro_ext.modulate", "x", x, vectors, seq_ids, check_ids,
                               std::numeric_limits<double>::quiet_NaN());
}

Tensor modulate_backward_x_cuda(const Tensor& grad, const Tensor& vectors,
                                const std::optional<Tensor>& seq_ids) {
  // An invalid row's output is a constant: its gradient is zero.
  return modulate_out_of_place("pedro_ext.modulate_backward_x", "grad", grad, vectors, seq_ids,
                               /*check_ids=*/false, 0.0);
}

void modulate_inplace_cuda(const Tensor& x, const Tensor& vectors_in,
                           const std::optional<Tensor>& seq_ids, bool check_ids) {
  const char* op = "pedro_ext.modulate_";
  const ModulateSizes s = check_modulate_args(op, x, vectors_in, seq_ids);
  c10::cuda::CUDAGuard guard(x.device());
  const Tensor vectors = vectors_for_inplace(op, x, vectors_in);
  if (row_stride(x) < 0) {  // rows not evenly spaced: compute aside, then copy back
    x.copy_(modulate_cuda(x, vectors, seq_ids, check_ids));
    return;
  }
  if (seq_ids.has_value()) maybe_check_ranges(op, check_ids, {{"seq_ids", &*seq_ids, 0, s.B}});
  const Tensor v = last_dim_contiguous(vectors);
  launch_modulate(s, x, row_stride(x), v, x, row_stride(x), seq_ids,
                  std::numeric_limits<double>::quiet_NaN());
}

Tensor modulate_backward_vectors_cuda(const Tensor& grad_in, const Tensor& x_in,
                                      const std::optional<Tensor>& seq_ids, int64_t num_seqs) {
  const char* op = "pedro_ext.modulate_backward_vectors";
  check_same_shape(op, "grad", grad_in, x_in, "x");
  TORCH_CHECK_VALUE(num_seqs >= 0, op, ": num_seqs must be >= 0, got ", num_seqs);
  const ModulateSizes s = check_modulate_layout(op, x_in, num_seqs, x_in.size(-1), seq_ids, "x",
                                                "the number of sequences B (num_seqs)");
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = rows_view(x_in), grad = grad_in.contiguous();
  Tensor out = at::empty({s.B, s.D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modulate_bwd_cuda", [&] {
    constexpr int V = Pack<scalar_t>::kSize;
    const int64_t xs = row_stride(x);
    const bool vec = s.D % V == 0 && xs % V == 0 && aligned16(x.data_ptr()) &&
                     aligned16(grad.data_ptr());
    const ModulateTerm<scalar_t> term{grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), xs, s.D,
                                      vec};
    launch_request_sum<scalar_t>(op, term, s, seq_ids, out, at::cuda::getCurrentCUDAStream());
  });
  return out;
}

Tensor act_mul_modulate_cuda(const Tensor& gate_in, const Tensor& up_in, const Tensor& vectors,
                             const std::optional<Tensor>& seq_ids, std::string_view activation,
                             bool check_ids) {
  const char* op = "pedro_ext.act_mul_modulate";
  const ModulateSizes s = check_act_mul_args(op, gate_in, up_in, vectors, seq_ids);
  const Activation act = parse_activation(op, activation);
  c10::cuda::CUDAGuard guard(gate_in.device());
  if (seq_ids.has_value()) maybe_check_ranges(op, check_ids, {{"seq_ids", &*seq_ids, 0, s.B}});
  const Tensor gate = rows_view(gate_in), up = rows_view(up_in);
  const Tensor v = last_dim_contiguous(vectors);
  Tensor y = at::empty(gate_in.sizes(), gate_in.options());
  if (s.S == 0 || s.D == 0) return y;
  Tensor ids;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "act_mul_cuda", [&] {
    const Units units = units_for(s, sizeof(scalar_t));
    const unsigned int blocks = blocks_for(units.total, kWarps);
    with_activation(act, [&](auto a) {
      with_seq_ids(seq_ids, ids, [&](auto* seq) {
        using I = std::remove_const_t<std::remove_pointer_t<decltype(seq)>>;
        act_mul_kernel<decltype(a)::value, scalar_t, I>
            <<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                gate.data_ptr<scalar_t>(), row_stride(gate), up.data_ptr<scalar_t>(),
                row_stride(up), v.data_ptr<scalar_t>(), v.stride(0), y.data_ptr<scalar_t>(), seq,
                s, units);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> act_mul_modulate_backward_cuda(
    const Tensor& grad_in, const Tensor& gate_in, const Tensor& up_in, const Tensor& vectors,
    const std::optional<Tensor>& seq_ids, std::string_view activation) {
  const char* op = "pedro_ext.act_mul_modulate_backward";
  const ModulateSizes s = check_act_mul_args(op, gate_in, up_in, vectors, seq_ids);
  check_same_shape(op, "grad", grad_in, gate_in, "gate");
  const Activation act = parse_activation(op, activation);
  c10::cuda::CUDAGuard guard(gate_in.device());
  const Tensor gate = rows_view(gate_in), up = rows_view(up_in), grad = grad_in.contiguous();
  const Tensor v = last_dim_contiguous(vectors);
  Tensor g_gate = at::empty(gate_in.sizes(), gate_in.options());
  Tensor g_up = at::empty(gate_in.sizes(), gate_in.options());
  Tensor g_v = at::empty({s.B, s.D}, gate_in.options());
  Tensor ids;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "act_mul_bwd_cuda", [&] {
    constexpr int V = Pack<scalar_t>::kSize;
    const int64_t gs = row_stride(gate), us = row_stride(up);
    with_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      if (s.S > 0 && s.D > 0) {
        with_seq_ids(seq_ids, ids, [&](auto* seq) {
          using I = std::remove_const_t<std::remove_pointer_t<decltype(seq)>>;
          act_mul_backward_kernel<A, scalar_t, I>
              <<<blocks_for(s.S * s.D, kThreads), kThreads, 0, stream>>>(
                  grad.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), gs,
                  up.data_ptr<scalar_t>(), us, v.data_ptr<scalar_t>(), v.stride(0),
                  g_gate.data_ptr<scalar_t>(), g_up.data_ptr<scalar_t>(), seq, s);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      const bool vec = s.D % V == 0 && gs % V == 0 && us % V == 0 &&
                       aligned16(grad.data_ptr()) && aligned16(gate.data_ptr()) &&
                       aligned16(up.data_ptr());
      const ActMulTerm<A, scalar_t> term{grad.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(),
                                         up.data_ptr<scalar_t>(), gs, us, s.D, vec};
      launch_request_sum<scalar_t>(op, term, s, seq_ids, g_v, stream);
    });
  });
  return {g_gate, g_up, g_v};
}

TORCH_LIBRARY_IMPL(pedro_ext, CUDA, m) {
  m.impl("modulate", &modulate_cuda);
  m.impl("modulate_", &modulate_inplace_cuda);
  m.impl("modulate_backward_x", &modulate_backward_x_cuda);
  m.impl("modulate_backward_vectors", &modulate_backward_vectors_cuda);
  m.impl("act_mul_modulate", &act_mul_modulate_cuda);
  m.impl("act_mul_modulate_backward", &act_mul_modulate_backward_cuda);
}

}  // namespace cuda_kernels
}  // namespace pedro_ext
