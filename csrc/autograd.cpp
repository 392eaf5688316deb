// Autograd of the per-token ops, registered in C++: a Python torch.library.register_autograd
// layer costs ~20 us per call (even under no_grad), which is most of the cost of scaling one
// decoding token. Backward calls the ops through the dispatcher, so it stays traceable
// (torch.compile) and device-agnostic.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>

namespace pedro_ext {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

Tensor call_modulate(const Tensor& x, const Tensor& v, const OptTensor& seq_ids, bool check_ids) {
  static auto op =
      find_op<Tensor(const Tensor&, const Tensor&, const OptTensor&, bool)>("pedro_ext::modulate");
  return op.call(x, v, seq_ids, check_ids);
}

void call_modulate_inplace(const Tensor& x, const Tensor& v, const OptTensor& seq_ids,
                           bool check_ids) {
  static auto op =
      find_op<void(const Tensor&, const Tensor&, const OptTensor&, bool)>("pedro_ext::modulate_");
  op.call(x, v, seq_ids, check_ids);
}

Tensor call_modulate_backward_x(const Tensor& grad, const Tensor& v, const OptTensor& seq_ids) {
  static auto op = find_op<Tensor(const Tensor&, const Tensor&, const OptTensor&)>(
      "pedro_ext::modulate_backward_x");
  return op.call(grad, v, seq_ids);
}

Tensor call_modulate_backward_vectors(const Tensor& grad, const Tensor& x, const OptTensor& seq_ids,
                                      c10::SymInt num_seqs) {
  static auto op = find_op<Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::SymInt)>(
      "pedro_ext::modulate_backward_vectors");
  return op.call(grad, x, seq_ids, std::move(num_seqs));
}

Tensor call_act_mul_modulate(const Tensor& gate, const Tensor& up, const Tensor& v,
                             const OptTensor& seq_ids, c10::string_view activation,
                             bool check_ids) {
  static auto op = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                  c10::string_view, bool)>("pedro_ext::act_mul_modulate");
  return op.call(gate, up, v, seq_ids, activation, check_ids);
}

std::tuple<Tensor, Tensor, Tensor> call_act_mul_modulate_backward(
    const Tensor& grad, const Tensor& gate, const Tensor& up, const Tensor& v,
    const OptTensor& seq_ids, c10::string_view activation) {
  static auto op = find_op<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
      c10::string_view)>("pedro_ext::act_mul_modulate_backward");
  return op.call(grad, gate, up, v, seq_ids, activation);
}

OptTensor saved_seq_ids(AutogradContext* ctx, const Tensor& saved) {
  if (ctx->saved_data["has_seq"].toBool()) return saved;
  return std::nullopt;
}

// The backward ops have no derivatives of their own: a backward that builds a graph
// (create_graph=True, for second derivatives) raises instead of giving zeros.
void check_first_order(const char* op, const variable_list& grads, const variable_list& saved) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto* list : {&grads, &saved})
    for (const Tensor& t : *list)
      TORCH_CHECK(!(t.defined() && t.requires_grad()), "pedro_ext.", op,
                  ": second derivatives are not implemented; a backward with create_graph=True "
                  "through this op would give wrong higher-order gradients. Where you need them "
                  "use the pure-PyTorch ops of pedro_ext.reference (in a PedroModel: within "
                  "pedro_ext.layer.reference_ops()).");
}

class ModulateFunction : public torch::autograd::Function<ModulateFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& vectors,
                        const OptTensor& seq_ids, bool check_ids) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["has_seq"] = seq_ids.has_value();
    ctx->saved_data["num_seqs"] = vectors.sym_size(0);
    ctx->save_for_backward({x, vectors, seq_ids.value_or(Tensor())});
    return call_modulate(x, vectors, seq_ids, check_ids);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    check_first_order("modulate", grads, saved);
    const OptTensor seq_ids = saved_seq_ids(ctx, saved[2]);
    const Tensor grad = grads[0];
    Tensor grad_x, grad_v;
    if (ctx->needs_input_grad(0)) grad_x = call_modulate_backward_x(grad, saved[1], seq_ids);
    if (ctx->needs_input_grad(1))
      grad_v = call_modulate_backward_vectors(grad, saved[0], seq_ids,
                                              ctx->saved_data["num_seqs"].toSymInt());
    return {grad_x, grad_v, Tensor(), Tensor()};
  }
};

class ActMulModulateFunction : public torch::autograd::Function<ActMulModulateFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& gate, const Tensor& up,
                        const Tensor& vectors, const OptTensor& seq_ids,
                        c10::string_view activation, bool check_ids) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["has_seq"] = seq_ids.has_value();
    ctx->saved_data["activation"] = std::string(activation);
    ctx->save_for_backward({gate, up, vectors, seq_ids.value_or(Tensor())});
    return call_act_mul_modulate(gate, up, vectors, seq_ids, activation, check_ids);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    check_first_order("act_mul_modulate", grads, saved);
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    auto [g_gate, g_up, g_v] = call_act_mul_modulate_backward(
        grads[0], saved[0], saved[1], saved[2], saved_seq_ids(ctx, saved[3]), activation);
    return {g_gate, g_up, g_v, Tensor(), Tensor(), Tensor()};
  }
};

// Inference (no grad mode, or no input that needs grad) skips the autograd node: at decode
// time its bookkeeping would cost more than the scaling itself.
bool needs_grad(std::initializer_list<const Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : inputs)
    if (t->requires_grad()) return true;
  return false;
}

Tensor modulate_autograd(const Tensor& x, const Tensor& vectors, const OptTensor& seq_ids,
                         bool check_ids) {
  if (!needs_grad({&x, &vectors})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_modulate(x, vectors, seq_ids, check_ids);
  }
  return ModulateFunction::apply(x, vectors, seq_ids, check_ids);
}

Tensor act_mul_modulate_autograd(const Tensor& gate, const Tensor& up, const Tensor& vectors,
                                 const OptTensor& seq_ids, c10::string_view activation,
                                 bool check_ids) {
  if (!needs_grad({&gate, &up, &vectors})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_act_mul_modulate(gate, up, vectors, seq_ids, activation, check_ids);
  }
  return ActMulModulateFunction::apply(gate, up, vectors, seq_ids, activation, check_ids);
}

// modulate_ has no derivative: refuse rather than leave autograd silently wrong.
void modulate_inplace_autograd(const Tensor& x, const Tensor& vectors, const OptTensor& seq_ids,
                               bool check_ids) {
  TORCH_CHECK(!needs_grad({&x, &vectors}),
              "pedro_ext.modulate_: the in-place op has no autograd, but x.requires_grad=",
              x.requires_grad(), " and vectors.requires_grad=", vectors.requires_grad(),
              " with grad mode on; call it under torch.no_grad() / torch.inference_mode(), or "
              "use pedro_ext.modulate when gradients are needed");
  at::AutoDispatchBelowAutograd guard;
  call_modulate_inplace(x, vectors, seq_ids, check_ids);
}

// In-place ops bump the version counter, so a tensor saved for some backward before the
// call is detected as modified.
void modulate_inplace_ad_inplace_or_view(const Tensor& x, const Tensor& vectors,
                                         const OptTensor& seq_ids, bool check_ids) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    call_modulate_inplace(x, vectors, seq_ids, check_ids);
  }
  torch::autograd::impl::bump_version(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(pedro_ext, Autograd, m) {
  m.impl("modulate", &modulate_autograd);
  m.impl("modulate_", &modulate_inplace_autograd);
  m.impl("act_mul_modulate", &act_mul_modulate_autograd);
}

TORCH_LIBRARY_IMPL(pedro_ext, ADInplaceOrView, m) {
  m.impl("modulate_", &modulate_inplace_ad_inplace_or_view);
}

}  // namespace pedro_ext
