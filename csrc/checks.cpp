// Argument checks shared by the CPU and CUDA implementations. Every message names the op,
// the argument and what was expected, and what was got; they surface in Python as
// ValueError / TypeError / IndexError.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

#include "pedro.h"

namespace pedro_ext {
namespace {

std::atomic<bool> g_cuda_index_checks{true};

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

bool is_index_type(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

void check_float(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

void check_index_tensor(const char* op, const char* name, const Tensor& ids, const Tensor& ref,
                        const char* ref_name, int64_t expected_len) {
  TORCH_CHECK_VALUE(ids.device() == ref.device(), op, ": ", name, " is on ", ids.device(),
                    " but ", ref_name, " is on ", ref.device(),
                    "; all arguments must be on one device");
  TORCH_CHECK_TYPE(is_index_type(ids.scalar_type()), op, ": ", name,
                   " must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == expected_len, op, ": ", name,
                    " must be 1-D of length ", expected_len, ", got shape ", ids.sizes());
}

void check_dims(const char* op, const char* name, const Tensor& t, int64_t dims,
                const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dims, op, ": ", name, " must be ", dims, "-D ", layout,
                    ", got shape ", t.sizes());
}

void check_size(const char* op, const char* name, const Tensor& t, int64_t dim, int64_t expected,
                const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") is ", what,
                    " and must be ", expected, ", got shape ", t.sizes());
}

}  // namespace

void check_like(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; all arguments must be on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
                   t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
                   "; all floating-point arguments must share one dtype");
}

bool cuda_index_checks_enabled() { return g_cuda_index_checks.load(); }
void set_cuda_index_checks_enabled(bool enabled) { g_cuda_index_checks.store(enabled); }

void check_index_ranges(const char* op, std::initializer_list<IdRange> ranges) {
  std::vector<Tensor> ends;
  for (const IdRange& r : ranges) {
    if (r.ids->numel() == 0) continue;
    auto [mn, mx] = at::aminmax(*r.ids);
    ends.push_back(mn.to(at::kLong));
    ends.push_back(mx.to(at::kLong));
  }
  if (ends.empty()) return;
  const Tensor host = at::stack(ends).cpu();  // the one device-to-host copy
  const int64_t* v = host.data_ptr<int64_t>();
  size_t i = 0;
  for (const IdRange& r : ranges) {
    if (r.ids->numel() == 0) continue;
    const int64_t lo_seen = v[i++], hi_seen = v[i++];
    TORCH_CHECK_INDEX(lo_seen >= r.lo && hi_seen < r.hi, op, ": ", r.name,
                      " values must lie in [", r.lo, ", ", r.hi, "), got values from ", lo_seen,
                      " to ", hi_seen);
  }
}

int64_t row_stride(const Tensor& t) {
  const int64_t D = t.size(-1);
  if (D > 1 && t.stride(-1) != 1) return -1;
  if (t.dim() == 2) return t.stride(0);
  if (t.size(1) == 1) return t.stride(0);
  if (t.size(0) == 1 || t.stride(0) == t.size(1) * t.stride(1)) return t.stride(1);
  return -1;
}

Tensor rows_view(const Tensor& t) { return row_stride(t) >= 0 ? t : t.contiguous(); }

namespace {

// Sufficient test of distinct elements: with the dims of size > 1 sorted by stride, each stride
// exceeds the largest offset the smaller dims reach. Holds for every layout torch's own ops
// produce (contiguous, permuted, sliced); false for stride 0 and for rows that overlap.
bool elements_distinct(const Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;
    reach += stride * (size - 1);
  }
  return true;
}

// [first byte, one past the last byte) of t's elements (strides are non-negative in torch).
std::pair<uintptr_t, uintptr_t> byte_range(const Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

}  // namespace

Tensor vectors_for_inplace(const char* op, const Tensor& x, const Tensor& vectors) {
  if (x.numel() == 0) return vectors;
  TORCH_CHECK(elements_distinct(x), op, ": x has elements that may share memory (sizes ",
              x.sizes(), ", strides ", x.strides(),
              "), so writing it in place would give wrong results; pass x.clone() or use "
              "pedro_ext.modulate");
  if (vectors.numel() == 0) return vectors;
  const auto [x0, x1] = byte_range(x);
  const auto [v0, v1] = byte_range(vectors);
  return x0 < v1 && v0 < x1 ? vectors.clone(at::MemoryFormat::Contiguous) : vectors;
}

Activation parse_activation(const char* op, std::string_view name) {
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK_VALUE(false, op, ": activation must be 'silu' or 'gelu_tanh', got '", name, "'");
}

void check_same_shape(const char* op, const char* name, const Tensor& t, const Tensor& like,
                      const char* like_name) {
  check_like(op, name, t, like, like_name);
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ",
                    like_name, " ", like.sizes(), ", got ", t.sizes());
}

void check_rational_args(const char* op, const Tensor& x, const Tensor& rat_num,
                         const Tensor& rat_den) {
  check_float(op, "x", x);
  check_like(op, "rat_num", rat_num, x, "x");
  check_like(op, "rat_den", rat_den, x, "x");
  check_dims(op, "rat_num", rat_num, 1, "[m + 1] holding c0..cm");
  check_dims(op, "rat_den", rat_den, 1, "[n] holding d1..dn");
  TORCH_CHECK_VALUE(rat_num.size(0) >= 1, op,
                    ": rat_num needs at least one coefficient (c0), got shape ", rat_num.sizes());
}

GenerateSizes check_generate_args(const char* op, const Tensor& pooled, const Tensor& adapter_ids,
                                  const Tensor& w_down, const Tensor& b_down, const Tensor& rat_num,
                                  const Tensor& rat_den, const Tensor& w_up,
                                  const std::optional<Tensor>& b_up) {
  check_float(op, "pooled", pooled);
  check_dims(op, "pooled", pooled, 2, "[B, d]");
  check_dims(op, "w_down", w_down, 3, "[N, d, r]");
  GenerateSizes s;
  s.B = pooled.size(0);
  s.d = pooled.size(1);
  s.N = w_down.size(0);
  s.r = w_down.size(2);
  check_index_tensor(op, "adapter_ids", adapter_ids, pooled, "pooled", s.B);
  check_like(op, "w_down", w_down, pooled, "pooled");
  check_size(op, "w_down", w_down, 1, s.d, "d (pooled.size(1))");
  check_like(op, "b_down", b_down, pooled, "pooled");
  check_dims(op, "b_down", b_down, 2, "[N, r]");
  check_size(op, "b_down", b_down, 0, s.N, "N (w_down.size(0))");
  check_size(op, "b_down", b_down, 1, s.r, "r (w_down.size(2))");
  check_like(op, "rat_num", rat_num, pooled, "pooled");
  check_dims(op, "rat_num", rat_num, 2, "[N, m + 1]");
  check_size(op, "rat_num", rat_num, 0, s.N, "N (w_down.size(0))");
  TORCH_CHECK_VALUE(rat_num.size(1) >= 1, op,
                    ": rat_num needs at least one coefficient (c0) per adapter, got shape ",
                    rat_num.sizes());
  check_like(op, "rat_den", rat_den, pooled, "pooled");
  check_dims(op, "rat_den", rat_den, 2, "[N, n]");
  check_size(op, "rat_den", rat_den, 0, s.N, "N (w_down.size(0))");
  check_like(op, "w_up", w_up, pooled, "pooled");
  check_dims(op, "w_up", w_up, 3, "[N, r, D]");
  check_size(op, "w_up", w_up, 0, s.N, "N (w_down.size(0))");
  check_size(op, "w_up", w_up, 1, s.r, "r (w_down.size(2))");
  s.D = w_up.size(2);
  s.num_len = rat_num.size(1);
  s.den_len = rat_den.size(1);
  if (b_up.has_value()) {
    check_like(op, "b_up", *b_up, pooled, "pooled");
    check_dims(op, "b_up", *b_up, 2, "[N, D]");
    check_size(op, "b_up", *b_up, 0, s.N, "N (w_down.size(0))");
    check_size(op, "b_up", *b_up, 1, s.D, "D (w_up.size(2))");
  }
  return s;
}

void check_generate_grad(const char* op, const Tensor& grad, const Tensor& pooled,
                         const GenerateSizes& s) {
  TORCH_CHECK_VALUE(grad.device() == pooled.device(), op, ": grad is on ", grad.device(),
                    " but pooled is on ", pooled.device(), "; all arguments must be on one device");
  check_float(op, "grad", grad);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == s.B && grad.size(1) == s.D, op,
                    ": grad must be [B, D] = [", s.B, ", ", s.D, "], got shape ", grad.sizes());
}

ModulateSizes check_modulate_layout(const char* op, const Tensor& x, int64_t B, int64_t D,
                                    const std::optional<Tensor>& seq_ids, const char* x_name,
                                    const char* b_what, const char* d_what) {
  check_float(op, x_name, x);
  ModulateSizes s{0, D, B, 0};
  if (seq_ids.has_value()) {
    check_dims(op, x_name, x, 2, "[S, D] (packed, with seq_ids)");
    s.S = x.size(0);
    check_index_tensor(op, "seq_ids", *seq_ids, x, x_name, s.S);
  } else {
    check_dims(op, x_name, x, 3, "[B, T, D] (padded, without seq_ids)");
    check_size(op, x_name, x, 0, B, b_what);
    s.T = x.size(1);
    s.S = B * s.T;
  }
  check_size(op, x_name, x, x.dim() - 1, D, d_what);
  return s;
}

ModulateSizes check_modulate_args(const char* op, const Tensor& x, const Tensor& vectors,
                                  const std::optional<Tensor>& seq_ids, const char* x_name) {
  check_float(op, x_name, x);
  check_like(op, "vectors", vectors, x, x_name);
  check_dims(op, "vectors", vectors, 2, "[B, D]");
  return check_modulate_layout(op, x, vectors.size(0), vectors.size(1), seq_ids, x_name,
                               "the number of sequences B (vectors.size(0))",
                               "the vector width D (vectors.size(1))");
}

ModulateSizes check_act_mul_args(const char* op, const Tensor& gate, const Tensor& up,
                                 const Tensor& vectors, const std::optional<Tensor>& seq_ids) {
  const ModulateSizes s = check_modulate_args(op, gate, vectors, seq_ids, "gate");
  check_same_shape(op, "up", up, gate, "gate");
  return s;
}

}  // namespace pedro_ext

