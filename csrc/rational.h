// The "safe" Pade unit and its derivatives, written once for the CPU and CUDA kernels.
//
//   R(z) = P(z) / Q(z),   P(z) = c0 + c1 z + ... + cm z^m,
//                         Q(z) = 1 + |A(z)|,  A(z) = d1 z + ... + dn z^n.
//
// Q >= 1, so R never divides by zero. Convention: sign(0) = 0, which matches the
// subgradient torch.abs uses, so the pure-PyTorch reference and these kernels agree.
// Everything is evaluated in the accumulation type `acc_t` (float for half, bfloat16
// and float inputs; double for double), never in the storage type: z^5 overflows fp16.
//
// Large |z|: P, A and the gradients' products reach z^(m+n) and more, which overflows float
// long before R does (R(1e8) ~ 1e8 needs z^5 = 1e40 with the default degrees). The terms are
// therefore kept scaled by a power of two s = 2^e >= |z| (s = 1 for |z| <= 1): w = z / s and
// u = 1 / s are at most 1 in magnitude, and each result is unscaled at the end by ldexp.
// Scaling by a power of two is exact, so wherever the unscaled arithmetic neither overflows
// nor underflows the results are bit-for-bit those of the plain formulas.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define PEDRO_HD __host__ __device__ __forceinline__
#else
#define PEDRO_HD inline
#endif

namespace pedro_ext {

PEDRO_HD float scale_pow2(float x, int e) { return ldexpf(x, e); }
PEDRO_HD double scale_pow2(double x, int e) { return ldexp(x, e); }
PEDRO_HD float split_pow2(float x, int* e) { return frexpf(x, e); }
PEDRO_HD double split_pow2(double x, int* e) { return frexp(x, e); }

// The terms at one point z, scaled by s = 2^e (see above): with u = 1/s,
//   p = P u^m, dp = P' u^(m-1), a = A u^n, da = A' u^(n-1), q = Q u^n = u^n + |a|,
// where m = num_len - 1 and n = den_len.
template <typename acc_t>
struct RationalTerms {
  acc_t p;
  acc_t dp;
  acc_t a;
  acc_t da;
  acc_t q;
  acc_t w;  // z / s
  int e;    // s = 2^e
  int m, n;
};

// Horner evaluation of P, P', A, A' in the scaled form. `num` holds c0..c_{num_len-1}, `den`
// d1..d_{den_len}.
template <typename acc_t, typename coef_t>
PEDRO_HD RationalTerms<acc_t> rational_terms(acc_t z, const coef_t* num, int num_len,
                                             const coef_t* den, int den_len) {
  RationalTerms<acc_t> t;
  t.m = num_len - 1;
  t.n = den_len;
  t.e = 0;
  const acc_t az = z < acc_t(0) ? -z : z;
  if (az > acc_t(1) && az - az == acc_t(0)) {  // finite and > 1 (inf and NaN propagate as before)
    split_pow2(az, &t.e);                       // az = f 2^e, f in [0.5, 1)
  }
  const acc_t u = scale_pow2(acc_t(1), -t.e);
  const acc_t w = scale_pow2(z, -t.e);
  t.w = w;
  // p_j = (c_j + c_{j+1} z + ...) u^(m-j): p_j = p_{j+1} w + c_j u^(m-j)
  acc_t p = acc_t(0), dp = acc_t(0), up = acc_t(1);
  for (int j = num_len - 1; j >= 0; --j) {
    dp = dp * w + p;
    p = p * w + static_cast<acc_t>(num[j]) * up;
    up *= u;
  }
  // A(z) = z * S(z), S = d1 + d2 z + ... + dn z^{n-1}, kept as S u^(n-1), S' u^(n-2)
  acc_t sv = acc_t(0), ds = acc_t(0);
  up = acc_t(1);
  for (int k = den_len - 1; k >= 0; --k) {
    ds = ds * w + sv;
    sv = sv * w + static_cast<acc_t>(den[k]) * up;
    up *= u;
  }  // up = u^n
  t.p = p;
  t.dp = dp;
  t.a = w * sv;
  t.da = sv + w * ds;
  t.q = up + (t.a < acc_t(0) ? -t.a : t.a);
  return t;
}

template <typename acc_t>
PEDRO_HD acc_t sign_of(acc_t v) {
  return v > acc_t(0) ? acc_t(1) : (v < acc_t(0) ? acc_t(-1) : acc_t(0));
}

// R = P / Q = (p / q) s^(m-n)
template <typename acc_t>
PEDRO_HD acc_t rational_of(const RationalTerms<acc_t>& t) {
  return scale_pow2(t.p / t.q, t.e * (t.m - t.n));
}

template <typename acc_t, typename coef_t>
PEDRO_HD acc_t rational_value(acc_t z, const coef_t* num, int num_len, const coef_t* den,
                              int den_len) {
  return rational_of(rational_terms<acc_t>(z, num, num_len, den, den_len));
}

// dR/dz = P'/Q - sign(A) A' P / Q^2 = (dp/q - sign(a) da p / q^2) s^(m-n-1)
template <typename acc_t>
PEDRO_HD acc_t rational_dz(const RationalTerms<acc_t>& t) {
  return scale_pow2(t.dp / t.q - sign_of(t.a) * t.da * t.p / (t.q * t.q), t.e * (t.m - t.n - 1));
}

// Adds g * dR/dc_j = g z^j / Q = g w^j / q s^(j-n) to grad_num[j] and
// g * dR/dd_k = -g sign(A) z^k P / Q^2 = -g sign(a) w^k p / q^2 s^(m+k-2n) to grad_den[k-1],
// for one point z (its terms t) with upstream gradient g.
template <typename acc_t>
PEDRO_HD void rational_coef_grads_accumulate(acc_t g, const RationalTerms<acc_t>& t,
                                             acc_t* grad_num, int num_len, acc_t* grad_den,
                                             int den_len) {
  const acc_t inv_q = acc_t(1) / t.q;
  acc_t wp = acc_t(1);
  for (int j = 0; j < num_len; ++j) {
    grad_num[j] += scale_pow2(g * wp * inv_q, t.e * (j - t.n));
    wp *= t.w;
  }
  const acc_t c = -g * sign_of(t.a) * t.p * inv_q * inv_q;
  wp = t.w;
  for (int k = 0; k < den_len; ++k) {
    grad_den[k] += scale_pow2(c * wp, t.e * (t.m + k + 1 - 2 * t.n));
    wp *= t.w;
  }
}

}  // namespace pedro_ext
