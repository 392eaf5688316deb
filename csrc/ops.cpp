// Schemas of the pedro_ext ops. Kernels are registered per device next to their code (cpu/,
// cuda/); autograd for the per-token ops in autograd.cpp, fake kernels and the autograd of the
// others in pedro_ext/ops.py. check_ids=False skips the id range check (on CUDA a host sync);
// invalid ids then follow the rule in pedro.h. The *_backward ops never check ids.
#include <torch/library.h>

TORCH_LIBRARY(pedro_ext, m) {
  m.def("rational(Tensor x, Tensor rat_num, Tensor rat_den) -> Tensor");
  m.def(
      "rational_backward(Tensor grad, Tensor x, Tensor rat_num, Tensor rat_den)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "generate(Tensor pooled, Tensor adapter_ids, Tensor w_down, Tensor b_down, Tensor rat_num,"
      " Tensor rat_den, Tensor w_up, Tensor b_up, bool check_ids=True) -> Tensor");
  m.def(
      "generate_backward(Tensor grad, Tensor pooled, Tensor adapter_ids, Tensor w_down,"
      " Tensor b_down, Tensor rat_num, Tensor rat_den, Tensor w_up)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("modulate(Tensor x, Tensor vectors, Tensor? seq_ids, bool check_ids=True) -> Tensor");
  m.def("modulate_(Tensor(a!) x, Tensor vectors, Tensor? seq_ids, bool check_ids=True) -> ()");
  m.def("modulate_backward_x(Tensor grad, Tensor vectors, Tensor? seq_ids) -> Tensor");
  m.def(
      "modulate_backward_vectors(Tensor grad, Tensor x, Tensor? seq_ids, SymInt num_seqs)"
      " -> Tensor");
  m.def(
      "generate_and_modulate(Tensor x, Tensor? seq_ids, Tensor pooled, Tensor adapter_ids,"
      " Tensor w_down, Tensor b_down, Tensor rat_num, Tensor rat_den, Tensor w_up, Tensor b_up,"
      " bool check_ids=True) -> (Tensor, Tensor)");
  m.def(
      "act_mul_modulate(Tensor gate, Tensor up, Tensor vectors, Tensor? seq_ids,"
      " str activation, bool check_ids=True) -> Tensor");
  m.def(
      "act_mul_modulate_backward(Tensor grad, Tensor gate, Tensor up, Tensor vectors,"
      " Tensor? seq_ids, str activation) -> (Tensor, Tensor, Tensor)");
}
