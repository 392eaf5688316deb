// Autograd for modulate, the per-token hot path, registered in C++: a Python
// torch.library.register_autograd layer costs ~20 us per call, which is most of the cost of
// scaling one decoding token. Backward calls the ops through the dispatcher, so it stays
// traceable (torch.compile) and device-agnostic.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace pedro_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_modulate(const at::Tensor& x, const at::Tensor& v,
                         const std::optional<at::Tensor>& seq_ids) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pedro_ext::modulate", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  return op.call(x, v, seq_ids);
}

at::Tensor call_modulate_backward_vectors(const at::Tensor& grad, const at::Tensor& x,
                                          const std::optional<at::Tensor>& seq_ids,
                                          c10::SymInt num_seqs) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pedro_ext::modulate_backward_vectors", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, c10::SymInt)>();
  return op.call(grad, x, seq_ids, std::move(num_seqs));
}

class ModulateFunction : public torch::autograd::Function<ModulateFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& vectors,
                            const std::optional<at::Tensor>& seq_ids) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["has_seq"] = seq_ids.has_value();
    ctx->saved_data["num_seqs"] = vectors.sym_size(0);
    ctx->save_for_backward({x, vectors, seq_ids.value_or(at::Tensor())});
    return call_modulate(x, vectors, seq_ids);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& vectors = saved[1];
    std::optional<at::Tensor> seq_ids;
    if (ctx->saved_data["has_seq"].toBool()) seq_ids = saved[2];
    const at::Tensor grad = grads[0];
    at::Tensor grad_x, grad_v;
    if (ctx->needs_input_grad(0)) grad_x = call_modulate(grad, vectors, seq_ids);
    if (ctx->needs_input_grad(1))
      grad_v = call_modulate_backward_vectors(grad, x, seq_ids,
                                              ctx->saved_data["num_seqs"].toSymInt());
    return {grad_x, grad_v, at::Tensor()};
  }
};

at::Tensor modulate_autograd(const at::Tensor& x, const at::Tensor& vectors,
                             const std::optional<at::Tensor>& seq_ids) {
  return ModulateFunction::apply(x, vectors, seq_ids);
}

}  // namespace

TORCH_LIBRARY_IMPL(pedro_ext, Autograd, m) { m.impl("modulate", &modulate_autograd); }

}  // namespace pedro_ext
