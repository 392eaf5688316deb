#include "pedro.h"

namespace pedro_ext {

std::tuple<Tensor, Tensor> group_rows(const Tensor& keys, int64_t num_groups) {
  const Tensor k = keys.to(at::kLong);
  auto [sorted, order] = at::sort(k, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const Tensor bounds = at::arange(num_groups + 1, k.options());
  Tensor starts = at::searchsorted(sorted, bounds);
  return {order, starts};
}

}  // namespace pedro_ext
