// The native extension's Python module: the decode step (decode_step.cpp), the expert training
// kernels (experts.cpp) and the fused model ops (fused_ops.cpp), built together by nanomoe/native.py.

#include <torch/csrc/utils/pybind.h>

__attribute__((visibility("hidden"))) void register_decode_step(pybind11::module& m);
__attribute__((visibility("hidden"))) void register_experts(pybind11::module& m);
__attribute__((visibility("hidden"))) void register_fused_ops(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decode_step(m);
  register_experts(m);
  register_fused_ops(m);
}
