// Declarations shared by the op registration, the CPU kernels and the CUDA kernels.
//
// Invalid ids (one rule for every op and device): adapter_ids outside [-1, N) and seq_ids
// outside [0, B) raise IndexError when the op checks them (check_ids=True; on CUDA also
// set_cuda_index_checks(True) and no graph capture). When they reach a kernel, nothing is
// read out of bounds: the output the invalid id selects (a request's vector, a token's row)
// is the constant NaN, and a constant passes no gradient to any input.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <string_view>
#include <tuple>

namespace pedro_ext {

using at::Tensor;

// Sizes of one generate call, read off (and checked against) its arguments.
struct GenerateSizes {
  int64_t B;        // requests
  int64_t N;        // adapters in the bank
  int64_t d;        // pooled width
  int64_t r;        // bottleneck width
  int64_t D;        // vector width
  int64_t num_len;  // m + 1 numerator coefficients
  int64_t den_len;  // n denominator coefficients
};

// Sizes of one modulate call. Row s of x (x viewed as [S, D]) belongs to request
// s / T (padded, no seq_ids) or seq_ids[s] (packed, T == 0 then).
struct ModulateSizes {
  int64_t S;
  int64_t D;
  int64_t B;
  int64_t T;
};

enum class Activation { kSilu, kGeluTanh };

// ---- argument checks (checks.cpp): each names the op and the argument ------------------
GenerateSizes check_generate_args(const char* op, const Tensor& pooled, const Tensor& adapter_ids,
                                  const Tensor& w_down, const Tensor& b_down, const Tensor& rat_num,
                                  const Tensor& rat_den, const Tensor& w_up,
                                  const std::optional<Tensor>& b_up);
// grad of generate's output: [B, D] on pooled's device.
void check_generate_grad(const char* op, const Tensor& grad, const Tensor& pooled,
                         const GenerateSizes& s);
ModulateSizes check_modulate_args(const char* op, const Tensor& x, const Tensor& vectors,
                                  const std::optional<Tensor>& seq_ids, const char* x_name = "x");
// The x / seq_ids part of check_modulate_args, for ops that produce the vectors themselves.
ModulateSizes check_modulate_layout(const char* op, const Tensor& x, int64_t B, int64_t D,
                                    const std::optional<Tensor>& seq_ids,
                                    const char* x_name = "x",
                                    const char* b_what = "the number of sequences B",
                                    const char* d_what = "the vector width D");
// gate and up share x's layout in check_modulate_args.
ModulateSizes check_act_mul_args(const char* op, const Tensor& gate, const Tensor& up,
                                 const Tensor& vectors, const std::optional<Tensor>& seq_ids);
Activation parse_activation(const char* op, std::string_view name);
void check_rational_args(const char* op, const Tensor& x, const Tensor& rat_num,
                         const Tensor& rat_den);
// Same device and dtype as `ref`.
void check_like(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                const char* ref_name);
void check_same_shape(const char* op, const char* name, const Tensor& t, const Tensor& like,
                      const char* like_name);

struct IdRange {
  const char* name;
  const Tensor* ids;
  int64_t lo;  // allowed values: [lo, hi)
  int64_t hi;
};
// Raises IndexError unless every id lies in its range. All ranges are read with one
// device-to-host copy (one sync on CUDA).
void check_index_ranges(const char* op, std::initializer_list<IdRange> ranges);
// Whether CUDA ops verify index ranges on the host (a sync). Never done during graph capture.
bool cuda_index_checks_enabled();
void set_cuda_index_checks_enabled(bool enabled);
// The instruction set of the CPU elementwise loops chosen at load time: "avx2" or "baseline";
// whether this build has clones to choose from at all (GCC on x86-64).
const char* cpu_kernel_isa();
bool cpu_kernel_clones();

// Element stride between consecutive rows of t ([S, D] or [B, T, D]) viewed as [S, D] without
// a copy, or -1 when its rows are not evenly spaced with unit inner stride.
int64_t row_stride(const Tensor& t);
// t itself when row_stride(t) >= 0, else a contiguous copy.
Tensor rows_view(const Tensor& t);
// t itself when its last dimension is unit-stride (e.g. a column slice of a wider tensor),
// else a contiguous copy.
inline Tensor last_dim_contiguous(const Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}
// Ids of any integer dtype as a contiguous int64 tensor (the CPU kernels' index type).
inline Tensor ids_long(const Tensor& ids) { return ids.to(at::kLong).contiguous(); }

// modulate_'s memory rules. Raises RuntimeError unless x's elements provably occupy distinct
// memory (at::assert_no_internal_overlap gives up on non-dense tensors, e.g. rows that overlap
// each other); returns vectors, or a contiguous copy of it when its memory range meets x's, so
// the result is modulate's even when vectors is a view of x.
Tensor vectors_for_inplace(const char* op, const Tensor& x, const Tensor& vectors);

// at::parallel_for grain for items of about `work` multiply-adds each: small calls stay on the
// calling thread, where waking the thread pool would cost more than the work.
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work));
}

// ---- grouping (grouping.cpp) -------------------------------------------------------
// Stable grouping of rows by a small integer key in [0, num_groups); other keys (-1 = none,
// or invalid) belong to no group: they sit at order[0 : starts[0]] (keys < 0) and
// order[starts[num_groups] :] (keys >= num_groups). Group g is order[starts[g] : starts[g + 1]]
// in increasing row order, which is what makes every backward reduction run in a fixed
// order. No host sync.
std::tuple<Tensor, Tensor> group_rows(const Tensor& keys, int64_t num_groups);

// ---- CPU kernels (cpu/*.cpp) --------------------------------------------------------
Tensor rational_cpu(const Tensor& x, const Tensor& rat_num, const Tensor& rat_den);
std::tuple<Tensor, Tensor, Tensor> rational_backward_cpu(const Tensor& grad, const Tensor& x,
                                                         const Tensor& rat_num,
                                                         const Tensor& rat_den);
Tensor generate_cpu(const Tensor& pooled, const Tensor& adapter_ids, const Tensor& w_down,
                    const Tensor& b_down, const Tensor& rat_num, const Tensor& rat_den,
                    const Tensor& w_up, const Tensor& b_up, bool check_ids);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> generate_backward_cpu(
    const Tensor& grad, const Tensor& pooled, const Tensor& adapter_ids, const Tensor& w_down,
    const Tensor& b_down, const Tensor& rat_num, const Tensor& rat_den, const Tensor& w_up);
std::tuple<Tensor, Tensor> generate_and_modulate_cpu(
    const Tensor& x, const std::optional<Tensor>& seq_ids, const Tensor& pooled,
    const Tensor& adapter_ids, const Tensor& w_down, const Tensor& b_down, const Tensor& rat_num,
    const Tensor& rat_den, const Tensor& w_up, const Tensor& b_up, bool check_ids);
Tensor modulate_cpu(const Tensor& x, const Tensor& vectors, const std::optional<Tensor>& seq_ids,
                    bool check_ids);
void modulate_inplace_cpu(const Tensor& x, const Tensor& vectors,
                          const std::optional<Tensor>& seq_ids, bool check_ids);
Tensor modulate_backward_x_cpu(const Tensor& grad, const Tensor& vectors,
                               const std::optional<Tensor>& seq_ids);
Tensor modulate_backward_vectors_cpu(const Tensor& grad, const Tensor& x,
                                     const std::optional<Tensor>& seq_ids, int64_t num_seqs);
Tensor act_mul_modulate_cpu(const Tensor& gate, const Tensor& up, const Tensor& vectors,
                            const std::optional<Tensor>& seq_ids, std::string_view activation,
                            bool check_ids);
std::tuple<Tensor, Tensor, Tensor> act_mul_modulate_backward_cpu(
    const Tensor& grad, const Tensor& gate, const Tensor& up, const Tensor& vectors,
    const std::optional<Tensor>& seq_ids, std::string_view activation);

}  // namespace pedro_ext
