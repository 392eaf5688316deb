// The gated-MLP activations of act_mul_modulate's backward, written once for the CPU and CUDA
// kernels (the forward evaluates act exactly as eager torch does on its device instead, so that
// vectors of ones reproduce the bare MLP bitwise; gradients need no bitwise identity).
// Both have the form act(g) = g * sigmoid(s(g)):
//   silu:       s(g) = g
//   gelu_tanh:  0.5 g (1 + tanh(u)) = g sigmoid(2u),  u = sqrt(2/pi) (g + 0.044715 g^3)
// so one formula gives the value and the derivative
//   act'(g) = sig + g sig (1 - sig) s'(g),  sig = sigmoid(s(g)).
// Evaluated in the accumulation type (float for half, bfloat16 and float; double for double).
#pragma once

#include <cmath>

#include "pedro.h"
#include "rational.h"  // PEDRO_HD

namespace pedro_ext {

PEDRO_HD float exp_acc(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);
#else
  return std::exp(v);
#endif
}

PEDRO_HD double exp_acc(double v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);
#else
  return std::exp(v);
#endif
}

template <Activation A, typename acc_t>
PEDRO_HD acc_t act_arg(acc_t g) {
  if constexpr (A == Activation::kSilu) {
    return g;
  } else {
    return acc_t(1.5957691216057308) * (g + acc_t(0.044715) * g * g * g);  // 2 sqrt(2/pi)
  }
}

template <Activation A, typename acc_t>
PEDRO_HD acc_t act_arg_grad(acc_t g) {
  if constexpr (A == Activation::kSilu) {
    return acc_t(1);
  } else {
    return acc_t(1.5957691216057308) * (acc_t(1) + acc_t(3 * 0.044715) * g * g);
  }
}

template <Activation A, typename acc_t>
PEDRO_HD acc_t act_value(acc_t g) {
  return g / (acc_t(1) + exp_acc(-act_arg<A>(g)));
}

template <typename acc_t>
struct ActTerms {
  acc_t value;  // act(g)
  acc_t grad;   // act'(g)
};

template <Activation A, typename acc_t>
PEDRO_HD ActTerms<acc_t> act_terms(acc_t g) {
  const acc_t sig = acc_t(1) / (acc_t(1) + exp_acc(-act_arg<A>(g)));
  return {g * sig, sig + g * sig * (acc_t(1) - sig) * act_arg_grad<A>(g)};
}

}  // namespace pedro_ext
