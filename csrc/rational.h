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
// long before R does (with the default GELU coefficients the plain float32 gradient is NaN from
// |z| ~ 3e5). Where a term of the plain formulas overflows (never below plain_max, a bound
// computed once per coefficient set: 2^11 for the default coefficients) the terms are kept
// scaled by a power of two s = 2^e > |z|: w = z / s and u = 1 / s are at most 1 in magnitude,
// and each result is unscaled at the end. m and n are the degrees of the highest nonzero
// coefficients (identity init: m = 1, n = 0), so the scaled terms keep the size of the largest
// term instead of underflowing. Wherever the plain formulas' terms are finite (checked per
// point beyond plain_max; for the coefficient gradients, wherever |z|^L < 2^100 and Q < 2^40
// in float) the results are bit-for-bit theirs; elsewhere they are accurate to float rounding
// of the terms they are made of.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define PEDRO_HD __host__ __device__ __forceinline__
#define PEDRO_COLD __host__ __device__ __forceinline__
#else
#define PEDRO_HD inline __attribute__((always_inline))
#define PEDRO_COLD inline __attribute__((noinline, cold))
#endif

namespace pedro_ext {

// Exponent field and power-of-two construction by bit pattern: a multiply instead of a libm
// ldexp/frexp call per term (those cost 20x the arithmetic on the CPU and stop vectorising).
template <typename F>
struct FloatLayout;
template <>
struct FloatLayout<float> {
  using Bits = uint32_t;
  static constexpr int kMantissa = 23, kMaxField = 0xff, kBias = 127;
};
template <>
struct FloatLayout<double> {
  using Bits = uint64_t;
  static constexpr int kMantissa = 52, kMaxField = 0x7ff, kBias = 1023;
};

template <typename F>
PEDRO_HD int exponent_field(F x) {
  using L = FloatLayout<F>;
  typename L::Bits b;
  memcpy(&b, &x, sizeof b);  // (a register move, on the host and on CUDA)
  return static_cast<int>((b >> L::kMantissa) & static_cast<typename L::Bits>(L::kMaxField));
}

template <typename F>
PEDRO_HD F pow2_of_field(int field) {  // 2^(field - bias), field in [1, max field - 1]
  using L = FloatLayout<F>;
  const typename L::Bits b = static_cast<typename L::Bits>(field) << L::kMantissa;
  F x;
  memcpy(&x, &b, sizeof x);
  return x;
}

template <typename F>
PEDRO_HD bool is_finite(F x) {
  return exponent_field(x) != FloatLayout<F>::kMaxField;
}

// e with |z| = f 2^e, f in [0.5, 1), for finite |z| > 1; 0 otherwise (|z| <= 1, inf, NaN).
template <typename F>
PEDRO_HD int scale_exponent(F z) {
  using L = FloatLayout<F>;
  const int field = exponent_field(z);
  return (field >= L::kBias && field < L::kMaxField && (z > F(1) || z < F(-1)))
             ? field - (L::kBias - 1)
             : 0;
}

// x = f 2^e with f in [0.5, 1) for positive finite x (subnormal included); 0 for 0.
template <typename F>
PEDRO_HD int exponent_of(F x) {
  using L = FloatLayout<F>;
  const int field = exponent_field(x);
  if (field != 0) return field - (L::kBias - 1);
  const F two64 = F(18446744073709551616.0);  // 2^64 brings a subnormal into the normal range
  return x == F(0) ? 0 : exponent_field(x * two64) - (L::kBias - 1) - 64;
}

PEDRO_HD float ldexp_of(float x, int k) { return ldexpf(x, k); }
PEDRO_HD double ldexp_of(double x, int k) { return ldexp(x, k); }

// x * 2^k: one exact multiply while 2^k is a normal number, ldexp beyond (huge |z| only)
template <typename F>
PEDRO_HD F scale_pow2(F x, int k) {
  using L = FloatLayout<F>;
  if (k > -L::kBias && k <= L::kBias) return x * pow2_of_field<F>(k + L::kBias);
  return ldexp_of(x, k);
}

// One coefficient set, prepared once per set (not per point): full lengths for the gradients,
// the degrees of the highest nonzero coefficients, and the |z| up to which the plain formulas
// cannot overflow (there the scaling is skipped: it would be exact, but costs ~4x the plain
// arithmetic per point).
template <typename acc_t, typename coef_t>
struct RationalCoefs {
  const coef_t* num;  // c0..c_{num_len-1}
  int num_len;
  const coef_t* den;  // d1..d_{den_len}
  int den_len;
  int m, n;
  acc_t plain_max;
};

template <typename acc_t>
PEDRO_HD acc_t abs_of(acc_t v) {
  return v < acc_t(0) ? -v : v;
}

template <typename acc_t, typename coef_t>
PEDRO_HD RationalCoefs<acc_t, coef_t> rational_coefs(const coef_t* num, int num_len,
                                                     const coef_t* den, int den_len) {
  RationalCoefs<acc_t, coef_t> c{num, num_len, den, den_len, num_len - 1, den_len, acc_t(0)};
  while (c.m > 0 && static_cast<acc_t>(num[c.m]) == acc_t(0)) --c.m;
  while (c.n > 0 && static_cast<acc_t>(den[c.n - 1]) == acc_t(0)) --c.n;
  // Every term of the plain formulas is at most big^2 max(1, |z|)^power, big = L max(1,
  // |coefficients|), L = num_len + den_len + 1: power = max(m + n - 1, 2n) for A' P and
  // Q^2 in dR/dz; the powers z^j, z^k the coefficient gradients multiply by reach
  // num_len - 1 and den_len. (The upstream gradient multiplies some of them: the 2^28 left
  // below float's 2^128 leave room for it.)
  const acc_t count = acc_t(num_len + den_len + 1);
  acc_t big = count;
  for (int j = 0; j < num_len; ++j) {
    const acc_t a = abs_of(static_cast<acc_t>(num[j])) * count;
    big = a > big ? a : big;
  }
  for (int k = 0; k < den_len; ++k) {
    const acc_t a = abs_of(static_cast<acc_t>(den[k])) * count;
    big = a > big ? a : big;
  }
  if (!is_finite(big)) {  // (inf or NaN coefficients: never rely on the bound)
    c.plain_max = acc_t(1);
    return c;
  }
  // plain_max = 2^t with big^2 2^(t power) <= 2^100 (float) / 2^1000 (double)
  const int headroom = (sizeof(acc_t) == 4 ? 100 : 1000) - 2 * scale_exponent(big) - 2;
  int power = c.m + c.n - 1 > 2 * c.n ? c.m + c.n - 1 : 2 * c.n;
  power = power > num_len - 1 ? power : num_len - 1;
  power = power > den_len ? power : den_len;
  const int t = headroom / (power > 0 ? power : 1);
  c.plain_max = scale_pow2(acc_t(1), t < 0 ? 0 : (t > 100 ? 100 : t));
  return c;
}

// The terms at one point z, scaled by s = 2^e (see above): with u = 1/s,
//   p = P u^m, dp = P' u^(m-1), a = A u^n, da = A' u^(n-1), q = Q u^n = u^n + |a|,
// where m and n are the degrees of the highest nonzero coefficients; e = 0 (the plain
// formulas, u = 1) wherever those fit, and for inf and NaN, which propagate as in them.
template <typename acc_t>
struct RationalTerms {
  acc_t p;
  acc_t dp;
  acc_t a;
  acc_t da;
  acc_t q;
  acc_t w;  // z / s
  int e;    // s = 2^e
  // Scaled terms: q, p, dp and da are stored as mantissas in [0.5, 1) (q > 0) with their
  // exponents here, so that no product or quotient of them under- or overflows before the
  // result is unscaled (Q ~ 1 with u^n tiny; tiny coefficients). 0 for the plain formulas.
  int fq, fp, fdp, fda;
  int m, n;
};

// Horner evaluation of P, P', A, A'; `Scaled` = false is the plain formula (u = 1).
template <bool Scaled, typename acc_t, typename coef_t>
PEDRO_HD void rational_horner(RationalTerms<acc_t>& t, acc_t w, acc_t u,
                              const RationalCoefs<acc_t, coef_t>& c) {
  // p_j = (c_j + c_{j+1} z + ...) u^(m-j): p_j = p_{j+1} w + c_j u^(m-j)
  acc_t p = acc_t(0), dp = acc_t(0), up = acc_t(1);
  for (int j = c.m; j >= 0; --j) {
    dp = dp * w + p;
    p = p * w + (Scaled ? static_cast<acc_t>(c.num[j]) * up : static_cast<acc_t>(c.num[j]));
    if (Scaled) up *= u;
  }
  // A(z) = z * S(z), S = d1 + d2 z + ... + dn z^{n-1}, kept as S u^(n-1), S' u^(n-2)
  acc_t sv = acc_t(0), ds = acc_t(0);
  up = acc_t(1);
  for (int k = c.n - 1; k >= 0; --k) {
    ds = ds * w + sv;
    sv = sv * w + (Scaled ? static_cast<acc_t>(c.den[k]) * up : static_cast<acc_t>(c.den[k]));
    if (Scaled) up *= u;
  }  // up = u^n
  t.p = p;
  t.dp = dp;
  t.a = w * sv;
  t.da = sv + w * ds;
  t.q = up + abs_of(t.a);
}

// Whether every product the plain value and dR/dz form from these terms is finite (A' P, Q^2).
template <typename acc_t>
PEDRO_HD bool plain_terms_fit(const RationalTerms<acc_t>& t) {
  return is_finite(t.p) && is_finite(t.dp) && is_finite(t.da * t.p) && is_finite(t.q * t.q);
}

// Whether the plain coefficient gradients fit as well: the powers z^j, z^k they multiply by
// stay below 2^100 (float) and 1 / Q^2 above 2^-80, leaving float's range to the upstream
// gradient.
template <typename acc_t, typename coef_t>
PEDRO_HD bool plain_grads_fit(const RationalTerms<acc_t>& t, acc_t z,
                              const RationalCoefs<acc_t, coef_t>& c) {
  const bool f32 = sizeof(acc_t) == 4;
  const int grad_power = c.num_len - 1 > c.den_len ? c.num_len - 1 : c.den_len;
  return scale_exponent(z) * grad_power <= (f32 ? 100 : 1000) &&
         exponent_of(t.q) <= (f32 ? 40 : 400);
}

// The scaled terms in place of plain ones that do not fit. Out of line on the host, taking and
// returning copies: the hot loop keeps the plain terms in registers.
template <typename acc_t, typename coef_t>
PEDRO_COLD RationalTerms<acc_t> rational_rescaled(RationalTerms<acc_t> t, acc_t z,
                                                  const RationalCoefs<acc_t, coef_t> c) {
  t.e = scale_exponent(z);  // (0 for inf and NaN: they stay the plain formulas')
  if (t.e == 0) return t;
  const acc_t u = scale_pow2(acc_t(1), -t.e);
  t.w = z * u;
  rational_horner<true>(t, t.w, u, c);
  t.fq = exponent_of(abs_of(t.q));
  t.q = scale_pow2(t.q, -t.fq);
  t.fp = exponent_of(abs_of(t.p));
  t.p = scale_pow2(t.p, -t.fp);
  t.fdp = exponent_of(abs_of(t.dp));
  t.dp = scale_pow2(t.dp, -t.fdp);
  t.fda = exponent_of(abs_of(t.da));
  t.da = scale_pow2(t.da, -t.fda);
  return t;
}

// The plain formulas wherever they fit (always below plain_max, where no check is needed),
// so the results there are the plain formulas' to the bit; the scaled terms elsewhere.
template <typename acc_t, typename coef_t>
PEDRO_HD RationalTerms<acc_t> rational_terms(acc_t z, const RationalCoefs<acc_t, coef_t>& c) {
  RationalTerms<acc_t> t;
  t.m = c.m;
  t.n = c.n;
  t.e = 0;
  t.fq = t.fp = t.fdp = t.fda = 0;
  t.w = z;
  rational_horner<false>(t, z, acc_t(1), c);
  if (abs_of(z) > c.plain_max && !plain_terms_fit(t)) t = rational_rescaled(t, z, c);
  return t;
}

template <typename acc_t>
PEDRO_HD acc_t sign_of(acc_t v) {
  return v > acc_t(0) ? acc_t(1) : (v < acc_t(0) ? acc_t(-1) : acc_t(0));
}

// R = P / Q = (p / q) s^(m-n)
template <typename acc_t>
PEDRO_HD acc_t rational_of(const RationalTerms<acc_t>& t) {
  const acc_t r = t.p / t.q;
  return t.e == 0 ? r : scale_pow2(r, t.e * (t.m - t.n) + t.fp - t.fq);
}

template <typename acc_t, typename coef_t>
PEDRO_HD acc_t rational_value(acc_t z, const RationalCoefs<acc_t, coef_t>& c) {
  return rational_of(rational_terms(z, c));
}

// dR/dz = P'/Q - sign(A) A' P / Q^2 = (dp/q - sign(a) da p / q^2) s^(m-n-1); scaled, each
// term from mantissas with its own power of two
template <typename acc_t>
PEDRO_HD acc_t rational_dz(const RationalTerms<acc_t>& t) {
  if (t.e == 0) return t.dp / t.q - sign_of(t.a) * t.da * t.p / (t.q * t.q);
  const int k = t.e * (t.m - t.n - 1);
  return scale_pow2(t.dp / t.q, k + t.fdp - t.fq) -
         scale_pow2(sign_of(t.a) * t.da * (t.p / t.q) / t.q, k + t.fda + t.fp - 2 * t.fq);
}

// Adds g * dR/dc_j = g z^j / Q = g w^j / q s^(j-n) to grad_num[j] and
// g * dR/dd_k = -g sign(A) z^k P / Q^2 = -g sign(a) w^k p / q^2 s^(m+k-2n) to grad_den[k-1]
// for every coefficient (the full lengths of c), for the point z with terms t and upstream
// gradient g. Plain terms are rescaled here when the gradients' own products would not fit.
template <typename acc_t, typename coef_t>
PEDRO_HD void rational_coef_grads_accumulate(acc_t g, const RationalTerms<acc_t>& plain_or_scaled,
                                             acc_t z, const RationalCoefs<acc_t, coef_t>& c,
                                             acc_t* grad_num, acc_t* grad_den) {
  RationalTerms<acc_t> t = plain_or_scaled;
  if (t.e == 0 && abs_of(z) > c.plain_max && !plain_grads_fit(t, z, c))
    t = rational_rescaled(t, z, c);
  const acc_t inv_q = acc_t(1) / t.q;
  acc_t wp = acc_t(1);
  if (t.e == 0) {
    const acc_t cd = -g * sign_of(t.a) * t.p * inv_q * inv_q;
    for (int j = 0; j < c.num_len; ++j) {
      grad_num[j] += g * wp * inv_q;
      wp *= t.w;
    }
    wp = t.w;
    for (int k = 0; k < c.den_len; ++k) {
      grad_den[k] += cd * wp;
      wp *= t.w;
    }
    return;
  }
  // scaled, from the mantissas: g multiplies before the unscaling (any g, 0 included)
  const acc_t cd = -sign_of(t.a) * (t.p / t.q) / t.q;
  for (int j = 0; j < c.num_len; ++j) {
    grad_num[j] += scale_pow2(g * (wp * inv_q), t.e * (j - t.n) - t.fq);
    wp *= t.w;
  }
  wp = t.w;
  for (int k = 0; k < c.den_len; ++k) {
    grad_den[k] += scale_pow2(g * (cd * wp), t.e * (t.m + k + 1 - 2 * t.n) + t.fp - 2 * t.fq);
    wp *= t.w;
  }
}

}  // namespace pedro_ext
