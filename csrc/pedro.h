// Declarations shared by the op registration, the CPU kernels and the CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
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

// ---- argument checks (checks.cpp): each names the op and the argument ------------------
GenerateSizes check_generate_args(const char* op, const Tensor& pooled, const Tensor& adapter_ids,
                                  const Tensor& w_down, const Tensor& b_down, const Tensor& rat_num,
                                  const Tensor& rat_den, const Tensor& w_up,
                                  const std::optional<Tensor>& b_up);
ModulateSizes check_modulate_args(const char* op, const Tensor& x, const Tensor& vectors,
                                  const std::optional<Tensor>& seq_ids);
// The x / seq_ids part of check_modulate_args, for ops that produce the vectors themselves.
ModulateSizes check_modulate_layout(const char* op, const Tensor& x, int64_t B, int64_t D,
                                    const std::optional<Tensor>& seq_ids);
void check_rational_args(const char* op, const Tensor& x, const Tensor& rat_num,
                         const Tensor& rat_den);
// Same device and dtype as `ref`.
void check_like(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                const char* ref_name);
void check_same_shape(const char* op, const char* name, const Tensor& t, const Tensor& like,
                      const char* like_name);
// Raises IndexError unless every value of `ids` lies in [lo, hi). One device sync on CUDA.
void check_index_range(const char* op, const char* name, const Tensor& ids, int64_t lo, int64_t hi);
// Whether CUDA ops verify index ranges on the host (a sync). Never done during graph capture.
bool cuda_index_checks_enabled();
void set_cuda_index_checks_enabled(bool enabled);

// ---- grouping (grouping.cpp) -------------------------------------------------------
// Stable grouping of rows by a small integer key in [0, num_groups); other keys (-1 = none)
// belong to no group. Group g is order[starts[g] : starts[g + 1]] in increasing row order,
// which is what makes every backward reduction run in a fixed order. No host sync.
std::tuple<Tensor, Tensor> group_rows(const Tensor& keys, int64_t num_groups);

// ---- CPU kernels (cpu/*.cpp) --------------------------------------------------------
Tensor rational_cpu(const Tensor& x, const Tensor& rat_num, const Tensor& rat_den);
std::tuple<Tensor, Tensor, Tensor> rational_backward_cpu(const Tensor& grad, const Tensor& x,
                                                         const Tensor& rat_num,
                                                         const Tensor& rat_den);
Tensor generate_cpu(const Tensor& pooled, const Tensor& adapter_ids, const Tensor& w_down,
                    const Tensor& b_down, const Tensor& rat_num, const Tensor& rat_den,
                    const Tensor& w_up, const Tensor& b_up);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> generate_backward_cpu(
    const Tensor& grad, const Tensor& pooled, const Tensor& adapter_ids, const Tensor& w_down,
    const Tensor& b_down, const Tensor& rat_num, const Tensor& rat_den, const Tensor& w_up);
Tensor modulate_cpu(const Tensor& x, const Tensor& vectors, const std::optional<Tensor>& seq_ids);
Tensor modulate_backward_vectors_cpu(const Tensor& grad, const Tensor& x,
                                     const std::optional<Tensor>& seq_ids, int64_t num_seqs);
std::tuple<Tensor, Tensor> generate_and_modulate_cpu(
    const Tensor& x, const std::optional<Tensor>& seq_ids, const Tensor& pooled,
    const Tensor& adapter_ids, const Tensor& w_down, const Tensor& b_down, const Tensor& rat_num,
    const Tensor& rat_den, const Tensor& w_up, const Tensor& b_up);

}  // namespace pedro_ext
