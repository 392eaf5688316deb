// CPU kernels of the vector generator (rational, generate, their backward, the fused prefill):
// at::parallel_for over requests / adapters, contiguous inner loops, fp32 (fp64 for double)
// accumulation. Reductions over requests run in a fixed order, so results do not depend on
// the number of threads. Invalid adapter ids follow the rule in pedro.h.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../pedro.h"
#include "../rational.h"

namespace pedro_ext {
namespace {

constexpr int64_t kReduceChunk = 8192;  // fixed, so coefficient sums do not depend on threads

template <typename T>
std::vector<at::opmath_type<T>> to_acc(const T* p, int64_t n) {
  return std::vector<at::opmath_type<T>>(p, p + n);
}

// z = pooled_row @ w_down[a] + b_down[a]; returns the r values in acc precision.
template <typename T, typename acc_t>
void down_project(const T* pooled_row, const T* wd, const T* bd, int64_t d, int64_t r,
                  acc_t* z) {
  for (int64_t k = 0; k < r; ++k) z[k] = static_cast<acc_t>(bd[k]);
  for (int64_t i = 0; i < d; ++i) {
    const acc_t p = static_cast<acc_t>(pooled_row[i]);
    const T* wrow = wd + i * r;
    for (int64_t k = 0; k < r; ++k) z[k] += p * static_cast<acc_t>(wrow[k]);
  }
}

}  // namespace

Tensor rational_cpu(const Tensor& x_in, const Tensor& rat_num, const Tensor& rat_den) {
  check_rational_args("pedro_ext.rational", x_in, rat_num, rat_den);
  const Tensor x = x_in.contiguous();
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rational_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto num = to_acc(rat_num.contiguous().data_ptr<scalar_t>(), rat_num.numel());
    const auto den = to_acc(rat_den.contiguous().data_ptr<scalar_t>(), rat_den.numel());
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const auto coefs = rational_coefs<acc_t>(num.data(), (int)num.size(), den.data(),
                                             (int)den.size());
    at::parallel_for(0, x.numel(), 2048, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        yp[i] = static_cast<scalar_t>(rational_value(static_cast<acc_t>(xp[i]), coefs));
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> rational_backward_cpu(const Tensor& grad_in, const Tensor& x_in,
                                                         const Tensor& rat_num,
                                                         const Tensor& rat_den) {
  const char* op = "pedro_ext.rational_backward";
  check_rational_args(op, x_in, rat_num, rat_den);
  check_same_shape(op, "grad", grad_in, x_in, "x");
  const Tensor x = x_in.contiguous();
  const Tensor grad = grad_in.contiguous();
  Tensor grad_x = at::empty_like(x);
  Tensor grad_num, grad_den;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "rational_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto num = to_acc(rat_num.contiguous().data_ptr<scalar_t>(), rat_num.numel());
        const auto den = to_acc(rat_den.contiguous().data_ptr<scalar_t>(), rat_den.numel());
        const int nl = (int)num.size(), dl = (int)den.size(), nc = nl + dl;
        const auto coefs = rational_coefs<acc_t>(num.data(), nl, den.data(), dl);
        const int64_t n = x.numel();
        const int64_t chunks = (n + kReduceChunk - 1) / kReduceChunk;
        std::vector<acc_t> partial(chunks * nc, acc_t(0));
        const scalar_t* xp = x.data_ptr<scalar_t>();
        const scalar_t* gp = grad.data_ptr<scalar_t>();
        scalar_t* gxp = grad_x.data_ptr<scalar_t>();
        at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
          for (int64_t c = cb; c < ce; ++c) {
            acc_t* pc = partial.data() + c * nc;
            for (int64_t i = c * kReduceChunk; i < std::min(n, (c + 1) * kReduceChunk); ++i) {
              const acc_t z = static_cast<acc_t>(xp[i]);
              const acc_t g = static_cast<acc_t>(gp[i]);
              const auto t = rational_terms(z, coefs);
              gxp[i] = static_cast<scalar_t>(g * rational_dz(t));
              rational_coef_grads_accumulate(g, t, z, coefs, pc, pc + nl);
            }
          }
        });
        std::vector<acc_t> total(nc, acc_t(0));
        for (int64_t c = 0; c < chunks; ++c)
          for (int j = 0; j < nc; ++j) total[j] += partial[c * nc + j];
        auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
        Tensor t = at::from_blob(total.data(), {nc}, acc_opts).to(x.scalar_type());
        grad_num = t.slice(0, 0, nl).clone();
        grad_den = t.slice(0, nl, nc).clone();
      });
  return {grad_x.view(x_in.sizes()), grad_num, grad_den};
}

Tensor generate_cpu(const Tensor& pooled_in, const Tensor& adapter_ids, const Tensor& w_down_in,
                    const Tensor& b_down_in, const Tensor& rat_num_in, const Tensor& rat_den_in,
                    const Tensor& w_up_in, const Tensor& b_up_in, bool check_ids) {
  const char* op = "pedro_ext.generate";
  const GenerateSizes s = check_generate_args(op, pooled_in, adapter_ids, w_down_in, b_down_in,
                                              rat_num_in, rat_den_in, w_up_in, b_up_in);
  if (check_ids) check_index_ranges(op, {{"adapter_ids", &adapter_ids, -1, s.N}});
  const Tensor ids = ids_long(adapter_ids);
  const Tensor pooled = pooled_in.contiguous(), w_down = w_down_in.contiguous(),
               b_down = b_down_in.contiguous(), rat_num = rat_num_in.contiguous(),
               rat_den = rat_den_in.contiguous();
  // w_up / b_up may be column slices of a wider generator (one target's part, as the op's
  // Semantics allow): read them in place with their row strides.
  const Tensor w_up = last_dim_contiguous(w_up_in), b_up = last_dim_contiguous(b_up_in);
  const int64_t wu_s0 = w_up.stride(0), wu_s1 = w_up.stride(1), bu_s0 = b_up.stride(0);
  Tensor out = at::empty({s.B, s.D}, pooled.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), "generate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* idp = ids.data_ptr<int64_t>();
    const scalar_t* pp = pooled.data_ptr<scalar_t>();
    const scalar_t* wdp = w_down.data_ptr<scalar_t>();
    const scalar_t* bdp = b_down.data_ptr<scalar_t>();
    const scalar_t* np = rat_num.data_ptr<scalar_t>();
    const scalar_t* dp = rat_den.data_ptr<scalar_t>();
    const scalar_t* wup = w_up.data_ptr<scalar_t>();
    const scalar_t* bup = b_up.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const int64_t grain = grain_for(s.r * (s.d + s.D + s.num_len + s.den_len) + s.D);
    at::parallel_for(0, s.B, grain, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> z(s.r), acc(s.D);
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* orow = op_ + b * s.D;
        const int64_t a = idp[b];
        if (a < -1 || a >= s.N) {
          std::fill(orow, orow + s.D, std::numeric_limits<scalar_t>::quiet_NaN());
          continue;
        }
        if (a == -1) {
          std::fill(orow, orow + s.D, scalar_t(1));
          continue;
        }
        down_project(pp + b * s.d, wdp + a * s.d * s.r, bdp + a * s.r, s.d, s.r, z.data());
        const auto coefs = rational_coefs<acc_t>(np + a * s.num_len, (int)s.num_len,
                                                 dp + a * s.den_len, (int)s.den_len);
        const scalar_t* bu = bup + a * bu_s0;
        for (int64_t j = 0; j < s.D; ++j) acc[j] = static_cast<acc_t>(bu[j]);
        for (int64_t k = 0; k < s.r; ++k) {
          const acc_t h = rational_value(z[k], coefs);
          const scalar_t* wrow = wup + a * wu_s0 + k * wu_s1;
          for (int64_t j = 0; j < s.D; ++j) acc[j] += h * static_cast<acc_t>(wrow[j]);
        }
        for (int64_t j = 0; j < s.D; ++j) orow[j] = static_cast<scalar_t>(acc_t(1) + acc[j]);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> generate_backward_cpu(
    const Tensor& grad_in, const Tensor& pooled_in, const Tensor& adapter_ids,
    const Tensor& w_down_in, const Tensor& b_down_in, const Tensor& rat_num_in,
    const Tensor& rat_den_in, const Tensor& w_up_in) {
  const char* op = "pedro_ext.generate_backward";
  const GenerateSizes s = check_generate_args(op, pooled_in, adapter_ids, w_down_in, b_down_in,
                                              rat_num_in, rat_den_in, w_up_in, std::nullopt);
  check_generate_grad(op, grad_in, pooled_in, s);
  const Tensor ids = ids_long(adapter_ids);
  const Tensor grad = grad_in.to(pooled_in.scalar_type()).contiguous();
  const Tensor pooled = pooled_in.contiguous(), w_down = w_down_in.contiguous(),
               b_down = b_down_in.contiguous(), rat_num = rat_num_in.contiguous(),
               rat_den = rat_den_in.contiguous(), w_up = last_dim_contiguous(w_up_in);
  const int64_t wu_s0 = w_up.stride(0), wu_s1 = w_up.stride(1);
  auto [order_t, starts_t] = group_rows(ids, s.N);
  const auto opts = pooled.options();
  Tensor g_pooled = at::empty({s.B, s.d}, opts), g_wd = at::empty({s.N, s.d, s.r}, opts),
         g_bd = at::empty({s.N, s.r}, opts), g_num = at::empty({s.N, s.num_len}, opts),
         g_den = at::empty({s.N, s.den_len}, opts), g_wu = at::empty({s.N, s.r, s.D}, opts),
         g_bu = at::empty({s.N, s.D}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), "generate_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t nc = s.num_len + s.den_len;
    // Per-request intermediates, in acc precision: h = R(z), gz = dL/dz, coefficient grads.
    std::vector<acc_t> h(s.B * s.r, acc_t(0)), gz(s.B * s.r, acc_t(0)), gc(s.B * nc, acc_t(0));
    const int64_t* idp = ids.data_ptr<int64_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* pp = pooled.data_ptr<scalar_t>();
    const scalar_t* wdp = w_down.data_ptr<scalar_t>();
    const scalar_t* bdp = b_down.data_ptr<scalar_t>();
    const scalar_t* np = rat_num.data_ptr<scalar_t>();
    const scalar_t* dp = rat_den.data_ptr<scalar_t>();
    const scalar_t* wup = w_up.data_ptr<scalar_t>();
    const int64_t grain = grain_for(s.r * (s.d + 2 * s.D) + s.d);
    at::parallel_for(0, s.B, grain, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> z(s.r);
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* gprow = g_pooled.data_ptr<scalar_t>() + b * s.d;
        const int64_t a = idp[b];
        if (a < 0 || a >= s.N) {  // no adapter, or an invalid id (a constant NaN vector)
          std::fill(gprow, gprow + s.d, scalar_t(0));
          continue;
        }
        down_project(pp + b * s.d, wdp + a * s.d * s.r, bdp + a * s.r, s.d, s.r, z.data());
        const auto coefs = rational_coefs<acc_t>(np + a * s.num_len, (int)s.num_len,
                                                 dp + a * s.den_len, (int)s.den_len);
        const scalar_t* grow = gp + b * s.D;
        for (int64_t k = 0; k < s.r; ++k) {
          const scalar_t* wrow = wup + a * wu_s0 + k * wu_s1;
          acc_t gh = 0;
          for (int64_t j = 0; j < s.D; ++j)
            gh += static_cast<acc_t>(wrow[j]) * static_cast<acc_t>(grow[j]);
          const auto t = rational_terms(z[k], coefs);
          h[b * s.r + k] = rational_of(t);
          gz[b * s.r + k] = gh * rational_dz(t);
          acc_t* gcb = gc.data() + b * nc;
          rational_coef_grads_accumulate(gh, t, z[k], coefs, gcb, gcb + s.num_len);
        }
        const scalar_t* wd = wdp + a * s.d * s.r;
        const acc_t* gzb = gz.data() + b * s.r;
        for (int64_t i = 0; i < s.d; ++i) {
          acc_t acc = 0;
          for (int64_t k = 0; k < s.r; ++k) acc += static_cast<acc_t>(wd[i * s.r + k]) * gzb[k];
          gprow[i] = static_cast<scalar_t>(acc);
        }
      }
    });
    const int64_t* order = order_t.data_ptr<int64_t>();
    const int64_t* starts = starts_t.data_ptr<int64_t>();
    const int64_t requests_per_adapter = s.B / std::max<int64_t>(1, s.N) + 1;
    const int64_t adapter_grain = grain_for(requests_per_adapter * (s.r * (s.d + s.D) + s.D));
    at::parallel_for(0, s.N, adapter_grain, [&](int64_t n0, int64_t n1) {
      std::vector<acc_t> awu(s.r * s.D), abu(s.D), awd(s.d * s.r), abd(s.r), ac(nc);
      for (int64_t n = n0; n < n1; ++n) {
        std::fill(awu.begin(), awu.end(), acc_t(0));
        std::fill(abu.begin(), abu.end(), acc_t(0));
        std::fill(awd.begin(), awd.end(), acc_t(0));
        std::fill(abd.begin(), abd.end(), acc_t(0));
        std::fill(ac.begin(), ac.end(), acc_t(0));
        for (int64_t q = starts[n]; q < starts[n + 1]; ++q) {
          const int64_t b = order[q];
          const scalar_t* grow = gp + b * s.D;
          const scalar_t* prow = pp + b * s.d;
          const acc_t* hb = h.data() + b * s.r;
          const acc_t* gzb = gz.data() + b * s.r;
          for (int64_t j = 0; j < s.D; ++j) abu[j] += static_cast<acc_t>(grow[j]);
          for (int64_t k = 0; k < s.r; ++k) {
            acc_t* arow = awu.data() + k * s.D;
            for (int64_t j = 0; j < s.D; ++j) arow[j] += hb[k] * static_cast<acc_t>(grow[j]);
            abd[k] += gzb[k];
          }
          for (int64_t i = 0; i < s.d; ++i) {
            const acc_t p = static_cast<acc_t>(prow[i]);
            for (int64_t k = 0; k < s.r; ++k) awd[i * s.r + k] += p * gzb[k];
          }
          for (int64_t c = 0; c < nc; ++c) ac[c] += gc[b * nc + c];
        }
        auto store = [](const std::vector<acc_t>& src, scalar_t* dst) {
          for (size_t i = 0; i < src.size(); ++i) dst[i] = static_cast<scalar_t>(src[i]);
        };
        store(awu, g_wu.data_ptr<scalar_t>() + n * s.r * s.D);
        store(abu, g_bu.data_ptr<scalar_t>() + n * s.D);
        store(awd, g_wd.data_ptr<scalar_t>() + n * s.d * s.r);
        store(abd, g_bd.data_ptr<scalar_t>() + n * s.r);
        for (int64_t c = 0; c < s.num_len; ++c)
          g_num.data_ptr<scalar_t>()[n * s.num_len + c] = static_cast<scalar_t>(ac[c]);
        for (int64_t c = 0; c < s.den_len; ++c)
          g_den.data_ptr<scalar_t>()[n * s.den_len + c] =
              static_cast<scalar_t>(ac[s.num_len + c]);
      }
    });
  });
  return {g_pooled, g_wd, g_bd, g_num, g_den, g_wu, g_bu};
}

std::tuple<Tensor, Tensor> generate_and_modulate_cpu(
    const Tensor& x, const std::optional<Tensor>& seq_ids, const Tensor& pooled,
    const Tensor& adapter_ids, const Tensor& w_down, const Tensor& b_down, const Tensor& rat_num,
    const Tensor& rat_den, const Tensor& w_up, const Tensor& b_up, bool check_ids) {
  // On the CPU there is no launch to save: compose the two kernels.
  const char* op = "pedro_ext.generate_and_modulate";
  const GenerateSizes s = check_generate_args(op, pooled, adapter_ids, w_down, b_down, rat_num,
                                              rat_den, w_up, b_up);
  check_like(op, "x", x, pooled, "pooled");
  check_modulate_layout(op, x, s.B, s.D, seq_ids, "x", "the number of sequences B (pooled.size(0))",
                        "the vector width D (w_up.size(2))");
  if (check_ids) {
    if (seq_ids.has_value()) {
      check_index_ranges(op, {{"adapter_ids", &adapter_ids, -1, s.N}, {"seq_ids", &*seq_ids, 0, s.B}});
    } else {
      check_index_ranges(op, {{"adapter_ids", &adapter_ids, -1, s.N}});
    }
  }
  Tensor vectors = generate_cpu(pooled, adapter_ids, w_down, b_down, rat_num, rat_den, w_up, b_up,
                                /*check_ids=*/false);
  return {modulate_cpu(x, vectors, seq_ids, /*check_ids=*/false), vectors};
}

TORCH_LIBRARY_IMPL(pedro_ext, CPU, m) {
  m.impl("rational", &rational_cpu);
  m.impl("rational_backward", &rational_backward_cpu);
  m.impl("generate", &generate_cpu);
  m.impl("generate_backward", &generate_backward_cpu);
  m.impl("generate_and_modulate", &generate_and_modulate_cpu);
}

}  // namespace pedro_ext
