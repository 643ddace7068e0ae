// fp32 / bf16 tensor dispatch shared by the training kernels (experts.cpp, fused_ops.cpp): the
// kernels are templates over float and uint16_t (bf16 raw bits, converted by simd.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

namespace nanomoe_types {

// fp32 or bf16 (raw bits) data of a tensor, by the element type the templates use
template <typename T>
T* data(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, "nanomoe kernels: expected float32, got ", t.scalar_type());
    return t.data_ptr<float>();
  } else {
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, "nanomoe kernels: expected bfloat16, got ", t.scalar_type());
    return reinterpret_cast<uint16_t*>(t.data_ptr());
  }
}

// f(float{}) for float32 tensors, f(uint16_t{}) for bfloat16 ones
template <typename F>
void by_type(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kFloat) {
    f(float{});
  } else {
    f(uint16_t{});
  }
}

// f(a's tag, b's tag) for two fp32/bf16 tensors
template <typename F>
void by_types(const at::Tensor& a, const at::Tensor& b, F&& f) {
  by_type(a, [&](auto ta) { by_type(b, [&](auto tb) { f(ta, tb); }); });
}

}  // namespace nanomoe_types
