// Schemas of the pedro_ext ops. Kernels are registered per device next to their code
// (cpu/ops_cpu.cpp, cuda/ops_cuda.cu); fake kernels and autograd live in pedro_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(pedro_ext, m) {
  m.def("rational(Tensor x, Tensor rat_num, Tensor rat_den) -> Tensor");
  m.def(
      "rational_backward(Tensor grad, Tensor x, Tensor rat_num, Tensor rat_den)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "generate(Tensor pooled, Tensor adapter_ids, Tensor w_down, Tensor b_down, Tensor rat_num,"
      " Tensor rat_den, Tensor w_up, Tensor b_up) -> Tensor");
  m.def(
      "generate_backward(Tensor grad, Tensor pooled, Tensor adapter_ids, Tensor w_down,"
      " Tensor b_down, Tensor rat_num, Tensor rat_den, Tensor w_up)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("modulate(Tensor x, Tensor vectors, Tensor? seq_ids) -> Tensor");
  m.def(
      "modulate_backward_vectors(Tensor grad, Tensor x, Tensor? seq_ids, SymInt num_seqs)"
      " -> Tensor");
  m.def(
      "generate_and_modulate(Tensor x, Tensor? seq_ids, Tensor pooled, Tensor adapter_ids,"
      " Tensor w_down, Tensor b_down, Tensor rat_num, Tensor rat_den, Tensor w_up, Tensor b_up)"
      " -> (Tensor, Tensor)");
}
