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
// |z| ~ 3e5). The terms are therefore kept scaled by a power of two s = 2^e > |z| (s = 1 for
// |z| <= 1): w = z / s and u = 1 / s are at most 1 in magnitude, and each result is unscaled at
// the end. m and n are the degrees of the highest nonzero coefficients (identity init: m = 1,
// n = 0), so the scaled terms keep the size of the largest term instead of underflowing.
// Scaling by a power of two is exact, so wherever the plain formulas neither overflow nor
// underflow and no scaled term is subnormal the results are bit-for-bit theirs; for |z| <= 1
// always.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define PEDRO_HD __host__ __device__ __forceinline__
#else
#define PEDRO_HD inline __attribute__((always_inline))
#endif

namespace pedro_ext {

// Exponent field and power-of-two construction by bit pattern: a multiply instead of a libm
// ldexp/frexp call per term (those cost 20x the arithmetic on the CPU and stop vectorising).
PEDRO_HD uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  memcpy(&b, &x, sizeof b);
  return b;
#endif
}
PEDRO_HD uint64_t bits_of(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t b;
  memcpy(&b, &x, sizeof b);
  return b;
#endif
}
PEDRO_HD float float_of(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  memcpy(&x, &b, sizeof x);
  return x;
#endif
}
PEDRO_HD double float_of(uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double x;
  memcpy(&x, &b, sizeof x);
  return x;
#endif
}

// e with |z| = f 2^e, f in [0.5, 1), for finite |z| > 1; 0 otherwise (|z| <= 1, inf, NaN).
PEDRO_HD int scale_exponent(float z) {
  const int field = static_cast<int>((bits_of(z) >> 23) & 0xffu);
  return (field >= 127 && field < 255 && (z > 1.f || z < -1.f)) ? field - 126 : 0;
}
PEDRO_HD int scale_exponent(double z) {
  const int field = static_cast<int>((bits_of(z) >> 52) & 0x7ffu);
  return (field >= 1023 && field < 2047 && (z > 1.0 || z < -1.0)) ? field - 1022 : 0;
}

// x * 2^k: one exact multiply while 2^k is a normal number, ldexp beyond (huge |z| only)
PEDRO_HD float scale_pow2(float x, int k) {
  if (k >= -126 && k <= 127) return x * float_of(static_cast<uint32_t>(k + 127) << 23);
  return ldexpf(x, k);
}
PEDRO_HD double scale_pow2(double x, int k) {
  if (k >= -1022 && k <= 1023) return x * float_of(static_cast<uint64_t>(k + 1023) << 52);
  return ldexp(x, k);
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
  // Every term of the plain formulas is at most (L big)^2 max(1, |z|)^power, L = num_len +
  // den_len: power = m + 2n for A' P and Q^2 in dR/dz, and the powers z^j, z^k the
  // coefficient gradients multiply by reach num_len - 1 and den_len.
  acc_t big = acc_t(num_len + den_len + 1);
  for (int j = 0; j < num_len; ++j) {
    const acc_t a = abs_of(static_cast<acc_t>(num[j])) * acc_t(num_len + den_len + 1);
    big = a > big ? a : big;
  }
  for (int k = 0; k < den_len; ++k) {
    const acc_t a = abs_of(static_cast<acc_t>(den[k])) * acc_t(num_len + den_len + 1);
    big = a > big ? a : big;
  }
  // plain_max = 2^t with big^2 2^(t (m + 2n)) <= 2^100 (float) / 2^1000 (double)
  const int headroom = (sizeof(acc_t) == 4 ? 100 : 1000) - 2 * scale_exponent(big) - 2;
  int power = c.m + 2 * c.n;
  power = power > num_len - 1 ? power : num_len - 1;
  power = power > den_len ? power : den_len;
  const int t = headroom / (power > 0 ? power : 1);
  c.plain_max = scale_pow2(acc_t(1), t < 0 ? 0 : (t > 100 ? 100 : t));
  return c;
}

// The terms at one point z, scaled by s = 2^e (see above): with u = 1/s,
//   p = P u^m, dp = P' u^(m-1), a = A u^n, da = A' u^(n-1), q = Q u^n = u^n + |a|,
// where m and n are the degrees of the highest nonzero coefficients; e = 0 for
// |z| <= plain_max (and for inf and NaN, which propagate as in the plain formulas).
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

template <typename acc_t, typename coef_t>
PEDRO_HD RationalTerms<acc_t> rational_terms(acc_t z, const RationalCoefs<acc_t, coef_t>& c) {
  RationalTerms<acc_t> t;
  t.m = c.m;
  t.n = c.n;
  t.e = abs_of(z) > c.plain_max ? scale_exponent(z) : 0;
  t.w = z;
  if (t.e == 0) {
    rational_horner<false>(t, z, acc_t(1), c);
  } else {
    t.w = z * scale_pow2(acc_t(1), -t.e);
    rational_horner<true>(t, t.w, scale_pow2(acc_t(1), -t.e), c);
  }
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
  return t.e == 0 ? r : scale_pow2(r, t.e * (t.m - t.n));
}

template <typename acc_t, typename coef_t>
PEDRO_HD acc_t rational_value(acc_t z, const RationalCoefs<acc_t, coef_t>& c) {
  return rational_of(rational_terms(z, c));
}

// dR/dz = P'/Q - sign(A) A' P / Q^2 = (dp/q - sign(a) da p / q^2) s^(m-n-1)
template <typename acc_t>
PEDRO_HD acc_t rational_dz(const RationalTerms<acc_t>& t) {
  const acc_t d = t.dp / t.q - sign_of(t.a) * t.da * t.p / (t.q * t.q);
  return t.e == 0 ? d : scale_pow2(d, t.e * (t.m - t.n - 1));
}

// Adds g * dR/dc_j = g z^j / Q = g w^j / q s^(j-n) to grad_num[j] and
// g * dR/dd_k = -g sign(A) z^k P / Q^2 = -g sign(a) w^k p / q^2 s^(m+k-2n) to grad_den[k-1],
// for one point z (its terms t) with upstream gradient g; num_len and den_len are the full
// lengths (the coefficients above the degrees m and n have gradients too).
template <typename acc_t>
PEDRO_HD void rational_coef_grads_accumulate(acc_t g, const RationalTerms<acc_t>& t,
                                             acc_t* grad_num, int num_len, acc_t* grad_den,
                                             int den_len) {
  const acc_t inv_q = acc_t(1) / t.q;
  const acc_t c = -g * sign_of(t.a) * t.p * inv_q * inv_q;
  acc_t wp = acc_t(1);
  if (t.e == 0) {
    for (int j = 0; j < num_len; ++j) {
      grad_num[j] += g * wp * inv_q;
      wp *= t.w;
    }
    wp = t.w;
    for (int k = 0; k < den_len; ++k) {
      grad_den[k] += c * wp;
      wp *= t.w;
    }
    return;
  }
  for (int j = 0; j < num_len; ++j) {
    grad_num[j] += scale_pow2(g * wp * inv_q, t.e * (j - t.n));
    wp *= t.w;
  }
  wp = t.w;
  for (int k = 0; k < den_len; ++k) {
    grad_den[k] += scale_pow2(c * wp, t.e * (t.m + k + 1 - 2 * t.n));
    wp *= t.w;
  }
}

}  // namespace pedro_ext
