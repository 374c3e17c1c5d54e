// The AttnRes read on CPU, one token row at a time: one pass over the sources from memory.
// A token's L rows of D values stay in cache between the sweeps (statistics, then mixing), so
// each source row is read from memory once in the forward and once in the backward.
// Same math and saved statistics as attnres/ops/attn_res.py (see its docstring).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
std::vector<const T*> pointers(const std::vector<torch::Tensor>& sources) {
  std::vector<const T*> out;
  out.reserve(sources.size());
  for (const auto& v : sources) out.push_back(v.data_ptr<T>());
  return out;
}

// 64-byte vectors (GCC/Clang vector extensions): 16 floats or 8 doubles, in registers.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using vec = typename Vec<T>::type;
template <typename T>
constexpr int64_t W = 64 / sizeof(T);

template <typename T>
inline vec<T> load(const T* p) {
  vec<T> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void store(T* p, vec<T> v) {
  __builtin_memcpy(p, &v, sizeof v);
}
template <typename T>
inline T hsum(vec<T> v) {
  T out = 0;
  for (int64_t j = 0; j < W<T>; ++j) out += v[j];
  return out;
}

// (<a, a>, <a, b>) over d elements: two independent accumulators per product. With ``ahead``,
// prefetches the row that follows a (the next token's row of the same source): rows are often a
// page each, where the hardware prefetcher stops.
template <typename T>
std::pair<T, T> dots(const T* a, const T* b, int64_t d, bool square, bool ahead = false) {
  const int64_t w = W<T>, full = d - d % (2 * w);
  vec<T> s0 = {}, s1 = {}, p0 = {}, p1 = {};
  for (int64_t k = 0; k < full; k += 2 * w) {
    if (ahead) {
      __builtin_prefetch(a + d + k);
      __builtin_prefetch(a + d + k + w);
    }
    const vec<T> x0 = load(a + k), x1 = load(a + k + w);
    if (square) {
      s0 += x0 * x0;
      s1 += x1 * x1;
    }
    p0 += x0 * load(b + k);
    p1 += x1 * load(b + k + w);
  }
  T ss = hsum<T>(s0 + s1), sp = hsum<T>(p0 + p1);
  for (int64_t k = full; k < d; ++k) {
    ss += a[k] * a[k];
    sp += a[k] * b[k];
  }
  return {ss, sp};
}

template <typename T>
T dot(const T* a, const T* b, int64_t d) {
  return dots(a, b, d, false).second;
}

// o = sum_i p[i * n] * v[i][off:off + d], blocked so each o element is written once.
template <typename T>
void mix(const std::vector<const T*>& v, int64_t off, const T* p, int64_t n, int64_t d, T* o) {
  const int64_t L = v.size(), w = W<T>, full = d - d % (2 * w);
  for (int64_t k = 0; k < full; k += 2 * w) {
    vec<T> a0 = {}, a1 = {};
    for (int64_t i = 0; i < L; ++i) {
      const T pi = p[i * n];
      const T* x = v[i] + off + k;
      a0 += pi * load(x);
      a1 += pi * load(x + w);
    }
    store(o + k, a0);
    store(o + k + w, a1);
  }
  for (int64_t k = full; k < d; ++k) {
    T acc = 0;
    for (int64_t i = 0; i < L; ++i) acc += p[i * n] * v[i][off + k];
    o[k] = acc;
  }
}

template <typename T>
void forward_impl(const T* q, const T* w, double eps, const std::vector<const T*>& v, int64_t n, int64_t d,
                  T* out, T* s, T* r, T* p, T* rh) {
  const int64_t L = v.size();
  const T e = static_cast<T>(eps);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> h(d);
    for (int64_t t = begin; t < end; ++t) {
      T m = -INFINITY;
      for (int64_t i = 0; i < L; ++i) {
        const auto [ss, sq] = dots(v[i] + t * d, q, d, true, t + 1 < end);
        const T ri = T(1) / std::sqrt(ss / d + e);
        r[i * n + t] = ri;
        s[i * n + t] = sq * ri;
        m = std::max(m, sq * ri);
      }
      T z = 0;
      for (int64_t i = 0; i < L; ++i) z += (p[i * n + t] = std::exp(s[i * n + t] - m));
      for (int64_t i = 0; i < L; ++i) p[i * n + t] /= z;
      T* o = w ? h.data() : out + t * d;
      mix(v, t * d, p + t, n, d, o);
      if (w) {
        const T rr = T(1) / std::sqrt(dot(o, o, d) / d + e);
        rh[t] = rr;
        T* y = out + t * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) y[k] = o[k] * rr * w[k];
      }
    }
  });
}

template <typename T>
void backward_impl(const T* q, const T* w, const std::vector<const T*>& v, int64_t n, int64_t d, const T* s,
                   const T* r, const T* p, const T* rh, const T* dy, const T* dp_out, const std::vector<T*>& dv,
                   T* dq_parts, T* dw_parts) {
  const int64_t L = v.size();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    T* dq = dq_parts ? dq_parts + tid * d : nullptr;
    T* dw = dw_parts ? dw_parts + tid * d : nullptr;
    std::vector<T> hn(w ? d : 0), dhb(w ? d : 0), dp(L);
    for (int64_t t = begin; t < end; ++t) {
      const T* g = dy + t * d;
      const T* dh = g;
      if (w) {  // through the output norm: h recomputed from the sources
        const T rr = rh[t];
        mix(v, t * d, p + t, n, d, hn.data());
        T c = 0;
#pragma omp simd reduction(+ : c)
        for (int64_t k = 0; k < d; ++k) {
          hn[k] *= rr;
          c += hn[k] * g[k] * w[k];
        }
        c /= d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) dhb[k] = rr * (g[k] * w[k] - hn[k] * c);
        if (dw) {
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) dw[k] += g[k] * hn[k];
        }
        dh = dhb.data();
      }
      T mean = 0;
      for (int64_t i = 0; i < L; ++i) {
        dp[i] = dot(v[i] + t * d, dh, d) + (dp_out ? dp_out[i * n + t] : T(0));
        mean += p[i * n + t] * dp[i];
      }
      for (int64_t i = 0; i < L; ++i) {
        const T pi = p[i * n + t], ri = r[i * n + t];
        const T ds = pi * (dp[i] - mean);
        const T c1 = ds * ri, c2 = -ds * s[i * n + t] * ri * ri / d;
        const T* x = v[i] + t * d;
        if (dv[i]) {
          T* o = dv[i] + t * d;
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) o[k] = pi * dh[k] + c1 * q[k] + c2 * x[k];
        }
        if (dq) {
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) dq[k] += c1 * x[k];
        }
      }
    }
  });
}

void check(const torch::Tensor& qp, const c10::optional<torch::Tensor>& w, const std::vector<torch::Tensor>& sources) {
  TORCH_CHECK(!sources.empty(), "attnres read: need at least one source");
  TORCH_CHECK(!w || (w->device().is_cpu() && w->is_contiguous() && w->scalar_type() == qp.scalar_type() &&
                     w->numel() == qp.numel()),
              "attnres read: w must be a contiguous CPU [D] of qp's dtype");
  TORCH_CHECK(qp.dim() == 1 && qp.size(0) > 0 && qp.is_contiguous() && qp.device().is_cpu(),
              "attnres read: qp must be a contiguous CPU [D], D > 0");
  for (const auto& v : sources) {
    TORCH_CHECK(v.device().is_cpu() && v.is_contiguous() && v.scalar_type() == qp.scalar_type() &&
                    v.numel() == sources[0].numel() && v.size(-1) == qp.size(0),
                "attnres read: sources must be contiguous CPU tensors of qp's dtype and one shape [..., D]");
  }
}

// Returns (o, s, r, p, rh); rh is empty without an output norm.
std::vector<torch::Tensor> read_forward(torch::Tensor qp, c10::optional<torch::Tensor> w, double eps,
                                        std::vector<torch::Tensor> sources) {
  check(qp, w, sources);
  const int64_t d = qp.size(0), n = sources[0].numel() / d, L = sources.size();
  auto out = torch::empty_like(sources[0]);
  auto opts = qp.options();
  auto s = torch::empty({L, n}, opts), r = torch::empty({L, n}, opts), p = torch::empty({L, n}, opts);
  auto rh = torch::empty({w ? n : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(qp.scalar_type(), "attnres_read_forward", [&] {
    forward_impl<scalar_t>(qp.data_ptr<scalar_t>(), w ? w->data_ptr<scalar_t>() : nullptr, eps,
                           pointers<scalar_t>(sources), n, d, out.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
                           r.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), w ? rh.data_ptr<scalar_t>() : nullptr);
  });
  return {out, s, r, p, rh};
}

// The forward output only, for inference: sources stacked as one contiguous [L, ..., D] tensor.
torch::Tensor read_forward_stacked(torch::Tensor qp, c10::optional<torch::Tensor> w, double eps, torch::Tensor bank) {
  TORCH_CHECK(bank.dim() >= 2 && bank.is_contiguous() && bank.size(0) >= 1, "attnres read: bank must be a contiguous [L, ..., D]");
  return read_forward(qp, w, eps, bank.unbind(0))[0];
}

// Returns (dqp or empty, dw or empty, *source grads (empty where not needed)).
std::vector<torch::Tensor> read_backward(torch::Tensor qp, c10::optional<torch::Tensor> w, torch::Tensor s,
                                         torch::Tensor r, torch::Tensor p, torch::Tensor rh, torch::Tensor dy,
                                         c10::optional<torch::Tensor> dp_out, std::vector<torch::Tensor> sources,
                                         bool need_dq, bool need_dw, std::vector<bool> need_dv) {
  check(qp, w, sources);
  const int64_t d = qp.size(0), n = sources[0].numel() / d, L = sources.size();
  TORCH_CHECK(dy.is_contiguous() && dy.numel() == n * d && dy.scalar_type() == qp.scalar_type(), "attnres read: bad dy");
  TORCH_CHECK(!dp_out || (dp_out->is_contiguous() && dp_out->numel() == L * n), "attnres read: bad dp_out");
  const int64_t threads = at::get_num_threads();
  auto opts = qp.options();
  auto dq_parts = torch::zeros({need_dq ? threads : 0, d}, opts);
  auto dw_parts = torch::zeros({need_dw && w ? threads : 0, d}, opts);
  std::vector<torch::Tensor> out = {torch::Tensor(), torch::Tensor()};
  AT_DISPATCH_FLOATING_TYPES(qp.scalar_type(), "attnres_read_backward", [&] {
    std::vector<scalar_t*> dv(L, nullptr);
    for (int64_t i = 0; i < L; ++i) {
      out.push_back(need_dv[i] ? torch::empty_like(sources[i]) : torch::Tensor());
      if (need_dv[i]) dv[i] = out.back().data_ptr<scalar_t>();
    }
    backward_impl<scalar_t>(qp.data_ptr<scalar_t>(), w ? w->data_ptr<scalar_t>() : nullptr,
                            pointers<scalar_t>(sources), n, d, s.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
                            p.data_ptr<scalar_t>(), w ? rh.data_ptr<scalar_t>() : nullptr, dy.data_ptr<scalar_t>(),
                            dp_out ? dp_out->data_ptr<scalar_t>() : nullptr, dv,
                            need_dq ? dq_parts.data_ptr<scalar_t>() : nullptr,
                            need_dw && w ? dw_parts.data_ptr<scalar_t>() : nullptr);
  });
  if (need_dq) out[0] = dq_parts.sum(0);
  if (need_dw && w) out[1] = dw_parts.sum(0);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("read_forward", &read_forward, "AttnRes read forward (CPU)");
  m.def("read_forward_stacked", &read_forward_stacked, "AttnRes read forward over a stacked bank (CPU)");
  m.def("read_backward", &read_backward, "AttnRes read backward (CPU)");
}
