// The Python module pedro_ext._C: importing it registers the ops (static initialisers in the
// other translation units); the few functions here are Python-only conveniences.
#include <torch/extension.h>

#include "pedro.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "pedro_ext kernels; the ops live in torch.ops.pedro_ext";
  m.def("set_cuda_index_checks", &pedro_ext::set_cuda_index_checks_enabled,
        "Enable/disable the host-side index-range check (one sync) of the CUDA ops");
  m.def("cuda_index_checks", &pedro_ext::cuda_index_checks_enabled);
  m.def("cpu_kernel_isa", &pedro_ext::cpu_kernel_isa,
        "Instruction set of the CPU elementwise loops picked for this CPU: avx2 or baseline");
  m.def("cpu_kernel_clones", &pedro_ext::cpu_kernel_clones,
        "Whether this build has per-instruction-set clones of the CPU loops (GCC, x86-64)");
#ifdef PEDRO_EXT_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_arch_list") = PEDRO_EXT_CUDA_ARCHS;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_arch_list") = "";
#endif
}
