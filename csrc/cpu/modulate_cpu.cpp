// CPU kernels of the per-token ops: modulate (and its in-place form and backward) and the fused
// gated-MLP act_mul_modulate. at::parallel_for over rows; each product in fp32 (fp64 for double),
// rounded once. Reductions over a request's rows run in a fixed order, so results do not depend
// on the number of threads. Rows with an invalid seq id follow the rule in pedro.h.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

#include "../activations.h"
#include "../pedro.h"

namespace pedro_ext {
namespace {

// The extension is built for baseline x86-64 (torch builds its own kernels once per CPU
// capability, which an extension cannot reuse): the hot elementwise loops get an AVX2 clone
// picked at load time, and the half types get AVX2 / F16C paths chosen at run time. The clone
// is chosen by the avx2 feature bit, not by "arch=haswell": GCC resolves an arch= clone by CPU
// model, true on Haswell itself only, so every other CPU (Intel or AMD) ran the SSE2 clone.
// GCC builds only: other compilers compile each loop once, for the baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEDRO_X86_CLONES 1
#define PEDRO_CLONE_ISA "avx2"
#define PEDRO_CPU_CLONES __attribute__((target_clones(PEDRO_CLONE_ISA, "default")))
#else
#define PEDRO_CPU_CLONES
#endif

// y[0:n] = x[0:n] * v[0:n] with the product in fp32 (fp64 for double), rounded once to T.
// y may be x (modulate_): every element is read before it is written at the same index, so
// ivdep (no loop-carried dependence) holds. Plain loops the compiler vectorises; at::vec's
// portable fallback was 2x slower.
template <typename T>
PEDRO_CPU_CLONES void scale_row(T* y, const T* x, const T* __restrict__ v, int64_t n) {
  using acc_t = at::opmath_type<T>;
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j)
    y[j] = static_cast<T>(static_cast<acc_t>(x[j]) * static_cast<acc_t>(v[j]));
}

#ifdef PEDRO_X86_CLONES
// Both half-type paths load 8 elements before storing 8, so y may be x here too.
__attribute__((target("avx2,f16c"))) void scale_row_f16c(c10::Half* y, const c10::Half* x,
                                                         const c10::Half* v, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j)));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + j)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + j),
                     _mm256_cvtps_ph(_mm256_mul_ps(a, b), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; j < n; ++j) y[j] = static_cast<c10::Half>(float(x[j]) * float(v[j]));
}

// bfloat16 widened by a shift; the product rounded to nearest even with NaN kept NaN, exactly
// as c10::BFloat16's conversion does.
__attribute__((target("avx2"))) void scale_row_bf16_avx2(c10::BFloat16* y,
                                                         const c10::BFloat16* x,
                                                         const c10::BFloat16* v, int64_t n) {
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  const __m256i qnan = _mm256_set1_epi32(0x7fc0);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i xa = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j)));
    const __m256i va = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + j)));
    const __m256 p = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(xa, 16)),
                                   _mm256_castsi256_ps(_mm256_slli_epi32(va, 16)));
    const __m256i u = _mm256_castps_si256(p);
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, bias), _mm256_and_si256(_mm256_srli_epi32(u, 16), one)), 16);
    const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
    r = _mm256_blendv_epi8(r, qnan, is_nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + j), _mm256_castsi256_si128(packed));
  }
  for (; j < n; ++j) y[j] = static_cast<c10::BFloat16>(float(x[j]) * float(v[j]));
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2");
const bool kHasF16c = kHasAvx2 && __builtin_cpu_supports("f16c");

// The half types: the SIMD path when the CPU has it, else the scalar loop.
template <typename T>
void scale_row_half(bool simd, void (*simd_row)(T*, const T*, const T*, int64_t), T* y,
                    const T* x, const T* v, int64_t n) {
  if (simd) {
    simd_row(y, x, v, n);
    return;
  }
  for (int64_t j = 0; j < n; ++j) y[j] = static_cast<T>(float(x[j]) * float(v[j]));
}

template <>
void scale_row(c10::BFloat16* y, const c10::BFloat16* x, const c10::BFloat16* __restrict__ v,
               int64_t n) {
  scale_row_half<c10::BFloat16>(kHasAvx2, scale_row_bf16_avx2, y, x, v, n);
}

template <>
void scale_row(c10::Half* y, const c10::Half* x, const c10::Half* __restrict__ v, int64_t n) {
  scale_row_half<c10::Half>(kHasF16c, scale_row_f16c, y, x, v, n);
}

#endif

// y[0:n] = (y * u) * v, each product rounded to T as two eager multiplications would be. For
// float and double that is one pass (the product is already in T); the half types take two
// passes of scale_row, whose SIMD paths round in between.
template <typename T>
PEDRO_CPU_CLONES void scale_row_twice(T* y, const T* __restrict__ u, const T* __restrict__ v,
                                      int64_t n) {
  if constexpr (std::is_same_v<at::opmath_type<T>, T>) {
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) y[j] = y[j] * u[j] * v[j];
  } else {
    scale_row(y, y, u, n);
    scale_row(y, y, v, n);
  }
}

// Request of a row, or -1 when its seq id is invalid (padded rows are always valid).
int64_t request_of(const int64_t* seq, int64_t row, const ModulateSizes& s) {
  if (!seq) return row / s.T;
  const int64_t b = seq[row];
  return b >= 0 && b < s.B ? b : -1;
}

// y[row] = x[row] * v[request of row] for every row (y may be x); invalid rows get `invalid`.
template <typename T>
void modulate_rows(T* y, int64_t ys, const T* x, int64_t xs, const T* v, int64_t vs,
                   const int64_t* seq, const ModulateSizes& s, T invalid) {
  at::parallel_for(0, s.S, grain_for(s.D), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = request_of(seq, row, s);
      if (b < 0) {
        std::fill(y + row * ys, y + row * ys + s.D, invalid);
      } else {
        scale_row(y + row * ys, x + row * xs, v + b * vs, s.D);
      }
    }
  });
}

// seq_ids as int64 (an undefined tensor without them), range-checked against B when asked.
Tensor checked_seq_ids(const char* op, const std::optional<Tensor>& seq_ids, int64_t B,
                       bool check) {
  if (!seq_ids.has_value()) return {};
  if (check) check_index_ranges(op, {{"seq_ids", &*seq_ids, 0, B}});
  return ids_long(*seq_ids);
}

// grad, vectors and seq_ids as modulate's x, vectors and seq_ids; invalid rows get `invalid`.
Tensor modulate_out_of_place(const char* op, const char* x_name, const Tensor& x_in,
                             const Tensor& vectors_in, const std::optional<Tensor>& seq_ids,
                             bool check_ids, double invalid) {
  const ModulateSizes s = check_modulate_args(op, x_in, vectors_in, seq_ids, x_name);
  const Tensor seq = checked_seq_ids(op, seq_ids, s.B, check_ids);
  const Tensor x = rows_view(x_in);
  const Tensor v = last_dim_contiguous(vectors_in);
  Tensor y = at::empty(x_in.sizes(), x_in.options());
  if (s.S == 0 || s.D == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modulate_cpu", [&] {
    modulate_rows<scalar_t>(y.data_ptr<scalar_t>(), s.D, x.data_ptr<scalar_t>(), row_stride(x),
                            v.data_ptr<scalar_t>(), v.stride(0),
                            seq.defined() ? seq.data_ptr<int64_t>() : nullptr, s,
                            static_cast<scalar_t>(invalid));
  });
  return y;
}

// Sums term(row, acc) over the rows of each request in increasing row order (rows with an
// invalid seq id belong to no request) and stores the [B, D] result rounded to T.
template <typename T, typename AddRow>
void sum_rows_per_request(T* out, const std::optional<Tensor>& seq_ids, const ModulateSizes& s,
                          AddRow add_row) {
  using acc_t = at::opmath_type<T>;
  Tensor order_t, starts_t;
  if (seq_ids.has_value()) std::tie(order_t, starts_t) = group_rows(*seq_ids, s.B);
  const int64_t* order = order_t.defined() ? order_t.data_ptr<int64_t>() : nullptr;
  const int64_t* starts = starts_t.defined() ? starts_t.data_ptr<int64_t>() : nullptr;
  const int64_t rows_per_request = s.B > 0 ? s.S / s.B + 1 : 1;
  at::parallel_for(0, s.B, grain_for(rows_per_request * s.D), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> acc(s.D);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int64_t q0 = order ? starts[b] : 0, q1 = order ? starts[b + 1] : s.T;
      for (int64_t q = q0; q < q1; ++q) add_row(order ? order[q] : b * s.T + q, acc.data());
      for (int64_t j = 0; j < s.D; ++j) out[b * s.D + j] = static_cast<T>(acc[j]);
    }
  });
}

template <typename F>
void dispatch_activation(Activation a, F f) {
  if (a == Activation::kSilu) {
    f(std::integral_constant<Activation, Activation::kSilu>{});
  } else {
    f(std::integral_constant<Activation, Activation::kGeluTanh>{});
  }
}

// Versions of one function, resolved by the same feature test as the clones above (one target
// string for both), so it names the clone the loops run; a clone's own body cannot tell, since
// __AVX2__ is fixed before cloning. Called from this file only: a caller in another translation
// unit would bind to the default version.
#ifdef PEDRO_X86_CLONES
__attribute__((target(PEDRO_CLONE_ISA))) const char* resolved_isa() { return PEDRO_CLONE_ISA; }
__attribute__((target("default"))) const char* resolved_isa() { return "baseline"; }
#else
const char* resolved_isa() { return "baseline"; }
#endif

}  // namespace

const char* cpu_kernel_isa() { return resolved_isa(); }
bool cpu_kernel_clones() {
#ifdef PEDRO_X86_CLONES
  return true;
#else
  return false;
#endif
}

Tensor modulate_cpu(const Tensor& x, const Tensor& vectors, const std::optional<Tensor>& seq_ids,
                    bool check_ids) {
  return modulate_out_of_place("pedro_ext.modulate", "x", x, vectors, seq_ids, check_ids,
                               std::numeric_limits<double>::quiet_NaN());
}

Tensor modulate_backward_x_cpu(const Tensor& grad, const Tensor& vectors,
                               const std::optional<Tensor>& seq_ids) {
  // An invalid row's output is a constant: its gradient is zero.
  return modulate_out_of_place("pedro_ext.modulate_backward_x", "grad", grad, vectors, seq_ids,
                               /*check_ids=*/false, 0.0);
}

void modulate_inplace_cpu(const Tensor& x, const Tensor& vectors_in,
                          const std::optional<Tensor>& seq_ids, bool check_ids) {
  const char* op = "pedro_ext.modulate_";
  const ModulateSizes s = check_modulate_args(op, x, vectors_in, seq_ids);
  const Tensor vectors = vectors_for_inplace(op, x, vectors_in);
  if (row_stride(x) < 0) {  // rows not evenly spaced: compute aside, then copy back
    x.copy_(modulate_cpu(x, vectors, seq_ids, check_ids));
    return;
  }
  const Tensor seq = checked_seq_ids(op, seq_ids, s.B, check_ids);
  if (s.S == 0 || s.D == 0) return;
  const Tensor v = last_dim_contiguous(vectors);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modulate_cpu_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    modulate_rows<scalar_t>(xp, row_stride(x), xp, row_stride(x), v.data_ptr<scalar_t>(),
                            v.stride(0), seq.defined() ? seq.data_ptr<int64_t>() : nullptr, s,
                            std::numeric_limits<scalar_t>::quiet_NaN());
  });
}

Tensor modulate_backward_vectors_cpu(const Tensor& grad_in, const Tensor& x_in,
                                     const std::optional<Tensor>& seq_ids, int64_t num_seqs) {
  const char* op = "pedro_ext.modulate_backward_vectors";
  check_same_shape(op, "grad", grad_in, x_in, "x");
  TORCH_CHECK_VALUE(num_seqs >= 0, op, ": num_seqs must be >= 0, got ", num_seqs);
  const ModulateSizes s = check_modulate_layout(op, x_in, num_seqs, x_in.size(-1), seq_ids, "x",
                                                "the number of sequences B (num_seqs)");
  const Tensor x = rows_view(x_in), grad = grad_in.contiguous();
  Tensor out = at::empty({s.B, s.D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modulate_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const int64_t xs = row_stride(x);
    sum_rows_per_request<scalar_t>(out.data_ptr<scalar_t>(), seq_ids, s, [&](int64_t row, acc_t* acc) {
      const scalar_t* xr = xp + row * xs;
      const scalar_t* gr = gp + row * s.D;
      for (int64_t j = 0; j < s.D; ++j)
        acc[j] += static_cast<acc_t>(gr[j]) * static_cast<acc_t>(xr[j]);
    });
  });
  return out;
}

Tensor act_mul_modulate_cpu(const Tensor& gate_in, const Tensor& up_in, const Tensor& vectors,
                            const std::optional<Tensor>& seq_ids, std::string_view activation,
                            bool check_ids) {
  const char* op = "pedro_ext.act_mul_modulate";
  const ModulateSizes s = check_act_mul_args(op, gate_in, up_in, vectors, seq_ids);
  const Activation act = parse_activation(op, activation);
  const Tensor seq = checked_seq_ids(op, seq_ids, s.B, check_ids);
  const Tensor up = rows_view(up_in);
  const Tensor v = last_dim_contiguous(vectors);
  Tensor y = at::empty(gate_in.sizes(), gate_in.options());
  if (s.S == 0 || s.D == 0) return y;
  // torch's own activation kernel (its vectorised exp / tanh), so that act(gate) is bitwise what
  // eager F.silu / F.gelu(approximate="tanh") return; then one pass scales it, as the bare MLP's
  // one multiplication pass would, rounding to T after each product like eager torch.
  if (act == Activation::kSilu) {
    at::silu_out(y, gate_in);
  } else {
    at::gelu_out(y, gate_in, "tanh");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "act_mul_cpu", [&] {
    const scalar_t* up_p = up.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t us = row_stride(up), vs = v.stride(0);
    const int64_t* sp = seq.defined() ? seq.data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, s.S, grain_for(s.D), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t b = request_of(sp, row, s);
        scalar_t* yr = yp + row * s.D;
        if (b < 0) {
          std::fill(yr, yr + s.D, std::numeric_limits<scalar_t>::quiet_NaN());
        } else {
          scale_row_twice(yr, up_p + row * us, vp + b * vs, s.D);
        }
      }
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> act_mul_modulate_backward_cpu(
    const Tensor& grad_in, const Tensor& gate_in, const Tensor& up_in, const Tensor& vectors,
    const std::optional<Tensor>& seq_ids, std::string_view activation) {
  const char* op = "pedro_ext.act_mul_modulate_backward";
  const ModulateSizes s = check_act_mul_args(op, gate_in, up_in, vectors, seq_ids);
  check_same_shape(op, "grad", grad_in, gate_in, "gate");
  const Activation act = parse_activation(op, activation);
  const Tensor seq = checked_seq_ids(op, seq_ids, s.B, /*check=*/false);
  const Tensor gate = rows_view(gate_in), up = rows_view(up_in), grad = grad_in.contiguous();
  const Tensor v = last_dim_contiguous(vectors);
  Tensor g_gate = at::empty(gate_in.sizes(), gate_in.options());
  Tensor g_up = at::empty(gate_in.sizes(), gate_in.options());
  Tensor g_v = at::empty({s.B, s.D}, gate_in.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "act_mul_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gate.data_ptr<scalar_t>();
    const scalar_t* up_p = up.data_ptr<scalar_t>();
    const scalar_t* dp = grad.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t gs = row_stride(gate), us = row_stride(up), vs = v.stride(0);
    const int64_t* sp = seq.defined() ? seq.data_ptr<int64_t>() : nullptr;
    dispatch_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      at::parallel_for(0, s.S, grain_for(s.D), [&](int64_t r0, int64_t r1) {
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t b = request_of(sp, row, s);
          scalar_t* ggr = g_gate.data_ptr<scalar_t>() + row * s.D;
          scalar_t* gur = g_up.data_ptr<scalar_t>() + row * s.D;
          if (b < 0) {  // the row's output is a constant
            std::fill(ggr, ggr + s.D, scalar_t(0));
            std::fill(gur, gur + s.D, scalar_t(0));
            continue;
          }
          const scalar_t* g = gp + row * gs;
          const scalar_t* u = up_p + row * us;
          const scalar_t* d = dp + row * s.D;
          const scalar_t* vr = vp + b * vs;
          for (int64_t j = 0; j < s.D; ++j) {
            const auto t = act_terms<A, acc_t>(static_cast<acc_t>(g[j]));
            const acc_t dv = static_cast<acc_t>(d[j]) * static_cast<acc_t>(vr[j]);
            ggr[j] = static_cast<scalar_t>(dv * static_cast<acc_t>(u[j]) * t.grad);
            gur[j] = static_cast<scalar_t>(dv * t.value);
          }
        }
      });
      sum_rows_per_request<scalar_t>(g_v.data_ptr<scalar_t>(), seq_ids, s, [&](int64_t row, acc_t* acc) {
        const scalar_t* g = gp + row * gs;
        const scalar_t* u = up_p + row * us;
        const scalar_t* d = dp + row * s.D;
        for (int64_t j = 0; j < s.D; ++j)
          acc[j] += static_cast<acc_t>(d[j]) * act_value<A>(static_cast<acc_t>(g[j])) *
                    static_cast<acc_t>(u[j]);
      });
    });
  });
  return {g_gate, g_up, g_v};
}

TORCH_LIBRARY_IMPL(pedro_ext, CPU, m) {
  m.impl("modulate", &modulate_cpu);
  m.impl("modulate_", &modulate_inplace_cpu);
  m.impl("modulate_backward_x", &modulate_backward_x_cpu);
  m.impl("modulate_backward_vectors", &modulate_backward_vectors_cpu);
  m.impl("act_mul_modulate", &act_mul_modulate_cpu);
  m.impl("act_mul_modulate_backward", &act_mul_modulate_backward_cpu);
}

}  // namespace pedro_ext
