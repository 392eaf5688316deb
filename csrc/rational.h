// The "safe" Pade unit and its derivatives, written once for the CPU and CUDA kernels.
//
//   R(z) = P(z) / Q(z),   P(z) = c0 + c1 z + ... + cm z^m,
//                         Q(z) = 1 + |A(z)|,  A(z) = d1 z + ... + dn z^n.
//
// Q >= 1, so R never divides by zero. Convention: sign(0) = 0, which matches the
// subgradient torch.abs uses, so the pure-PyTorch reference and these kernels agree.
// Everything is evaluated in the accumulation type `acc_t` (float for half, bfloat16
// and float inputs; double for double), never in the storage type: z^5 overflows fp16.
#pragma once

#if defined(__CUDACC__)
#define PEDRO_HD __host__ __device__ __forceinline__
#else
#define PEDRO_HD inline
#endif

namespace pedro_ext {

template <typename acc_t>
struct RationalTerms {
  acc_t p;      // P(z)
  acc_t dp;     // P'(z)
  acc_t a;      // A(z)
  acc_t da;     // A'(z)
  acc_t q;      // 1 + |A(z)|
};

// Horner evaluation of P, P', A, A'. `num` holds c0..c_{num_len-1}, `den` d1..d_{den_len}.
template <typename acc_t, typename coef_t>
PEDRO_HD RationalTerms<acc_t> rational_terms(acc_t z, const coef_t* num, int num_len,
                                             const coef_t* den, int den_len) {
  RationalTerms<acc_t> t;
  t.p = acc_t(0);
  t.dp = acc_t(0);
  for (int j = num_len - 1; j >= 0; --j) {
    t.dp = t.dp * z + t.p;
    t.p = t.p * z + static_cast<acc_t>(num[j]);
  }
  // A(z) = z * (d1 + d2 z + ... + dn z^{n-1})
  acc_t s = acc_t(0), ds = acc_t(0);
  for (int k = den_len - 1; k >= 0; --k) {
    ds = ds * z + s;
    s = s * z + static_cast<acc_t>(den[k]);
  }
  t.a = z * s;
  t.da = s + z * ds;
  t.q = acc_t(1) + (t.a < acc_t(0) ? -t.a : t.a);
  return t;
}

template <typename acc_t>
PEDRO_HD acc_t sign_of(acc_t v) {
  return v > acc_t(0) ? acc_t(1) : (v < acc_t(0) ? acc_t(-1) : acc_t(0));
}

template <typename acc_t, typename coef_t>
PEDRO_HD acc_t rational_value(acc_t z, const coef_t* num, int num_len, const coef_t* den,
                              int den_len) {
  const RationalTerms<acc_t> t = rational_terms<acc_t>(z, num, num_len, den, den_len);
  return t.p / t.q;
}

// dR/dz = P'/Q - sign(A) A' P / Q^2
template <typename acc_t>
PEDRO_HD acc_t rational_dz(const RationalTerms<acc_t>& t) {
  return t.dp / t.q - sign_of(t.a) * t.da * t.p / (t.q * t.q);
}

// Adds g * dR/dc_j = g z^j / Q to grad_num[j] and g * dR/dd_k = -g sign(A) z^k P / Q^2 to
// grad_den[k-1], for one point z with upstream gradient g.
template <typename acc_t>
PEDRO_HD void rational_coef_grads_accumulate(acc_t z, acc_t g, const RationalTerms<acc_t>& t,
                                             acc_t* grad_num, int num_len, acc_t* grad_den,
                                             int den_len) {
  const acc_t inv_q = acc_t(1) / t.q;
  acc_t zp = acc_t(1);
  for (int j = 0; j < num_len; ++j) {
    grad_num[j] += g * zp * inv_q;
    zp *= z;
  }
  const acc_t c = -g * sign_of(t.a) * t.p * inv_q * inv_q;
  zp = z;
  for (int k = 0; k < den_len; ++k) {
    grad_den[k] += c * zp;
    zp *= z;
  }
}

}  // namespace pedro_ext
