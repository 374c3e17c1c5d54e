// The AttnRes read on CPU, one token row at a time: one pass over the sources from memory.
// A token's L rows of D values stay in cache between the sweeps (statistics, then mixing), so
// each source row is read from memory once in the forward and once in the backward.
// Same math and saved statistics as attnres/ops/attn_res.py (see its docstring).
//
// Math in T = float (double when every source is double). Each source keeps its own dtype (float,
// bfloat16 or half with T = float), converted to T as it is loaded, so mixed sources (an fp32
// embedding next to bf16 sublayer outputs under autocast) are read in place, never copied. The output
// has the sources' promoted dtype unless a ``dtype`` is asked for (a bf16 autocast step: the next sublayer's
// matmul input, rounded once here instead of written in fp32 and cast), each source gradient its source's dtype;
// the output's gradient dy is read in its own dtype; statistics are in T.
//
// Two bindings of the same functions: pybind (the eager autograd.Function calls these directly) and
// the CPU kernels of the torch.library ops attnres::read_forward / read_backward / read_stacked, whose
// schemas, fake kernels and autograd are defined in attnres/ops/cpu_kernel.py (torch.compile calls them).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;
using bf16 = uint16_t;  // the bits of at::BFloat16
using f16 = _Float16;   // the bits of at::Half (IEEE binary16)

// 64-byte vectors (GCC/Clang vector extensions): 16 floats or 8 doubles, in registers.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using vec = typename Vec<T>::type;
template <typename T>
constexpr int64_t W = 64 / sizeof(T);
// W<T> elements of storage type S (32 bytes for 2-byte S next to a float vector).
template <typename S, typename T>
struct Pack {
  typedef S type __attribute__((vector_size(sizeof(S) * W<T>)));
};
typedef uint32_t u32x16 __attribute__((vector_size(64)));

template <typename T, typename S>
inline T up(S x) {
  if constexpr (std::is_same_v<S, bf16>) {
    const uint32_t u = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    return static_cast<T>(x);
  }
}

// Round to nearest even, as c10::BFloat16 does (NaN -> 0x7fc0).
inline bf16 round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? bf16(0x7fc0) : bf16(r);
}

template <typename O, typename T>
inline O down(T x) {
  if constexpr (std::is_same_v<O, bf16>) {
    return round_bf16(x);
  } else {
    return static_cast<O>(x);
  }
}

template <typename T, typename S>
inline vec<T> load(const S* p) {
  if constexpr (std::is_same_v<S, T>) {
    vec<T> v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else {
    typename Pack<S, T>::type h;
    std::memcpy(&h, p, sizeof h);
    if constexpr (std::is_same_v<S, bf16>) {
      const u32x16 u = __builtin_convertvector(h, u32x16) << 16;
      vec<T> v;
      std::memcpy(&v, &u, sizeof v);
      return v;
    } else {
      return __builtin_convertvector(h, vec<T>);
    }
  }
}

// fp32 -> bf16 in one instruction (vcvtneps2bf16, round to nearest even) where the CPU has it. It flushes
// subnormal inputs to zero, where Tensor.to(torch.bfloat16) rounds them: a vector holding one takes the
// exact path below (measured: the bf16 backward 0.87-0.89 of the time with the exact path alone). A NaN stays a
// NaN (the instruction keeps its sign and payload, the exact path writes 0x7fc0).
inline bool bf16_instruction(const vec<float>& v, bf16* p) {
#if defined(__AVX512BF16__)
  __m512 x;
  std::memcpy(&x, &v, sizeof x);
  const __m512i u = _mm512_castps_si512(x);
  const __mmask16 exp0 = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000));
  if (_mm512_mask_test_epi32_mask(exp0, u, _mm512_set1_epi32(0x007fffff))) return false;
  const __m256bh h = _mm512_cvtneps_pbh(x);
  std::memcpy(p, &h, sizeof h);
  return true;
#else
  (void)v;
  (void)p;
  return false;
#endif
}

template <typename T, typename O>
inline void store(O* p, vec<T> v) {
  if constexpr (std::is_same_v<O, T>) {
    std::memcpy(p, &v, sizeof v);
  } else if constexpr (std::is_same_v<O, bf16>) {
    static_assert(std::is_same_v<T, float>, "bf16 is written from float");
    if (bf16_instruction(v, p)) return;
    u32x16 u;
    std::memcpy(&u, &v, sizeof u);
    u32x16 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const u32x16 nan = (u32x16)(v != v);
    r = (r & ~nan) | (nan & 0x7fc0u);
    const auto h = __builtin_convertvector(r, typename Pack<bf16, T>::type);
    std::memcpy(p, &h, sizeof h);
  } else {
    const auto h = __builtin_convertvector(v, typename Pack<O, T>::type);
    std::memcpy(p, &h, sizeof h);
  }
}

// Prefetches the cache lines of ``bytes`` bytes at ``p`` for reading.
inline void prefetch_row(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
}

// The backward reads the statistics s, r, p [L, N] a token at a time, so a cache line of each row holds the values
// of 64 / sizeof(T) tokens: at the first token of a line, prefetch the next line of each row (measured: the
// backward ~7 % faster; the same for the forward's writes was not faster).
template <typename T>
inline void prefetch_stats(int64_t t, int64_t end, int64_t n, int64_t L, const T* s, const T* r, const T* p) {
  constexpr int64_t line = 64 / sizeof(T);
  if (t % line != 0 || t + line >= end) return;
  for (int64_t i = 0; i < L; ++i) {
    __builtin_prefetch(s + i * n + t + line);
    __builtin_prefetch(r + i * n + t + line);
    __builtin_prefetch(p + i * n + t + line);
  }
}

// Pairwise: log2(W) dependent vector adds instead of W dependent scalar adds.
template <typename T>
inline T hsum(vec<T> v) {
  if constexpr (W<T> == 16) {
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    return v[0] + v[1];
  } else {
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1);
    return v[0] + v[1];
  }
}

// The sources: a pointer and a storage kind each (0: T, 1: bfloat16, 2: half), and the indices of
// each kind, so a loop over the sources runs one branch-free inner loop per kind.
template <typename T>
struct Sources {
  std::vector<const void*> ptr;
  std::vector<int> kind;
  std::vector<int64_t> of[3];
  int64_t size() const { return static_cast<int64_t>(ptr.size()); }
};

template <typename T>
int kind_of(at::ScalarType st) {
  if (st == c10::CppTypeToScalarType<T>::value) return 0;
  if constexpr (std::is_same_v<T, float>) {
    if (st == at::kBFloat16) return 1;
    if (st == at::kHalf) return 2;
  }
  return -1;
}

// Calls f with a null pointer of the storage type of kind k.
template <typename T, typename F>
inline void visit(int k, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    if (k == 1) return f(static_cast<const bf16*>(nullptr));
    if (k == 2) return f(static_cast<const f16*>(nullptr));
  }
  f(static_cast<const T*>(nullptr));
}
#define ATTNRES_STORAGE(tag) std::remove_const_t<std::remove_pointer_t<decltype(tag)>>

template <typename T>
Sources<T> gather(at::TensorList sources) {
  Sources<T> v;
  for (int64_t i = 0; i < static_cast<int64_t>(sources.size()); ++i) {
    const int k = kind_of<T>(sources[i].scalar_type());
    v.ptr.push_back(sources[i].data_ptr());
    v.kind.push_back(k);
    v.of[k].push_back(i);
  }
  return v;
}

// (<a, a>, <a, b>) over d elements: two independent accumulators per product. With ``ahead``,
// prefetches the row that follows a (the next token's row of the same source): rows are often a
// page each, where the hardware prefetcher stops.
template <typename T, typename S>
std::pair<T, T> dots(const S* a, const T* b, int64_t d, bool square, bool ahead = false) {
  const int64_t w = W<T>, full = d - d % (2 * w);
  vec<T> s0 = {}, s1 = {}, p0 = {}, p1 = {};
  for (int64_t k = 0; k < full; k += 2 * w) {
    if (ahead) {
      __builtin_prefetch(a + d + k);
      __builtin_prefetch(a + d + k + w);
    }
    const vec<T> x0 = load<T>(a + k), x1 = load<T>(a + k + w);
    if (square) {
      s0 += x0 * x0;
      s1 += x1 * x1;
    }
    p0 += x0 * load<T>(b + k);
    p1 += x1 * load<T>(b + k + w);
  }
  T ss = hsum<T>(s0 + s1), sp = hsum<T>(p0 + p1);
  for (int64_t k = full; k < d; ++k) {
    const T x = up<T>(a[k]);
    ss += x * x;
    sp += x * b[k];
  }
  return {ss, sp};
}

template <typename T>
T dot(const T* a, const T* b, int64_t d) {
  return dots<T, T>(a, b, d, false).second;
}

// ahead > 0: prefetch the row ``ahead`` elements on (the next token's) of each 16-bit source (measured: the
// backward 11-23 % faster with bf16 sources; not faster with fp32 ones, so not done for them).
template <typename T, typename S>
inline void mix_kind(vec<T>& a0, vec<T>& a1, const Sources<T>& v, int k, int64_t off, const T* p, int64_t n,
                     int64_t ahead) {
  for (const int64_t i : v.of[k]) {
    const T pi = p[i * n];
    const S* x = static_cast<const S*>(v.ptr[i]) + off;
    if constexpr (!std::is_same_v<S, T>) {
      if (ahead) __builtin_prefetch(x + ahead);  // a block of 2 W<T> 16-bit values: one cache line
    }
    a0 += pi * load<T>(x);
    a1 += pi * load<T>(x + W<T>);
  }
}

// o = sum_i p[i * n] * v[i][off:off + d], blocked so each o element is written once. With ``ahead``, prefetches
// the next token's 16-bit rows (when the sources are read from memory here, not from cache after a sweep).
template <typename T>
void mix(const Sources<T>& v, int64_t off, const T* p, int64_t n, int64_t d, T* o, bool ahead = false) {
  const int64_t w = W<T>, full = d - d % (2 * w), pf = ahead ? d : 0;
  for (int64_t k = 0; k < full; k += 2 * w) {
    vec<T> a0 = {}, a1 = {};
    mix_kind<T, T>(a0, a1, v, 0, off + k, p, n, pf);
    if constexpr (std::is_same_v<T, float>) {
      mix_kind<T, bf16>(a0, a1, v, 1, off + k, p, n, pf);
      mix_kind<T, f16>(a0, a1, v, 2, off + k, p, n, pf);
    }
    store<T>(o + k, a0);
    store<T>(o + k + w, a1);
  }
  for (int64_t k = full; k < d; ++k) o[k] = 0;
  for (int64_t i = 0; i < v.size() && full < d; ++i) {
    const T pi = p[i * n];
    visit<T>(v.kind[i], [&](auto tag) {
      using S = ATTNRES_STORAGE(tag);
      const S* x = static_cast<const S*>(v.ptr[i]) + off;
      for (int64_t k = full; k < d; ++k) o[k] += pi * up<T>(x[k]);
    });
  }
}

// y = x * scale (* w), converted to y's type.
template <typename T, typename O>
inline void put_row(O* y, const T* x, T scale, const T* w, int64_t d) {
  const int64_t full = d - d % W<T>;
  for (int64_t k = 0; k < full; k += W<T>) {
    vec<T> v = load<T>(x + k) * scale;
    if (w) v *= load<T>(w + k);
    store<T>(y + k, v);
  }
  for (int64_t k = full; k < d; ++k) y[k] = down<O>(w ? x[k] * scale * w[k] : x[k] * scale);
}

// Output row t from its mix h: through the output norm (weight w; its rstd into rh[t]) or converted to O;
// nothing to do when h is the output row already (same type, no norm).
template <typename T, typename O>
inline void output_row(O* out, const T* h, const T* w, T e, int64_t d, int64_t t, T* rh) {
  if (w) {
    const T rr = T(1) / std::sqrt(dot(h, h, d) / d + e);
    rh[t] = rr;
    put_row<T, O>(out + t * d, h, rr, w, d);
  } else if constexpr (!std::is_same_v<O, T>) {
    put_row<T, O>(out + t * d, h, T(1), nullptr, d);
  }
}

// Per source of one token: the key rstd r = 1 / sqrt(ss / d + e) (over ss) and the logit s = sq * r (over sq),
// vectorised over the sources (the same IEEE operations as one at a time, so the same values).
template <typename T>
inline void key_stats(T* __restrict ss, T* __restrict sq, int64_t L, int64_t d, T e) {
#pragma omp simd
  for (int64_t i = 0; i < L; ++i) {
    ss[i] = T(1) / std::sqrt(ss[i] / d + e);
    sq[i] *= ss[i];
  }
}

// Tokens per tile of the forward: the statistics sweep reads kForwardTile consecutive rows of one source before
// the next source, so each source is read in runs of kForwardTile rows (pages at d 1024 fp32) instead of one;
// the tile's rows stay in L2 for the mix (measured at 9 x 8192 x 1024 fp32, two threads: 12.0-14.4 -> 10.4-11.8
// ms; of copy, tile 1: 0.74-0.77, 2: 0.74-0.75, 4: 0.82-0.83, 8: 0.78-0.82, 16: 0.86 in one run, not repeated).
constexpr int64_t kForwardTile = 4;

// One token's softmax over its L logits sq (with the rstd ss), stored into s, r and p at token t.
template <typename T>
inline void token_softmax(const T* ss, const T* sq, int64_t L, int64_t n, int64_t t, T* s, T* r, T* p) {
  T m = -INFINITY;
  for (int64_t i = 0; i < L; ++i) {
    r[i * n + t] = ss[i];
    s[i * n + t] = sq[i];
    m = std::max(m, sq[i]);
  }
  T z = 0;
  for (int64_t i = 0; i < L; ++i) z += (p[i * n + t] = std::exp(s[i * n + t] - m));
  for (int64_t i = 0; i < L; ++i) p[i * n + t] /= z;
}

template <typename T, typename O>
void forward_impl(const T* q, const T* w, double eps, const Sources<T>& v, int64_t n, int64_t d, O* out, T* s,
                  T* r, T* p, T* rh) {
  const int64_t L = v.size();
  const T e = static_cast<T>(eps);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    constexpr bool same = std::is_same_v<O, T>;
    std::vector<T> h(w || !same ? d : 0), ss(L * kForwardTile), sq(L * kForwardTile);  // [token of tile][source]
    for (int64_t t0 = begin; t0 < end; t0 += kForwardTile) {
      const int64_t m = std::min(kForwardTile, end - t0);
      for (int64_t i = 0; i < L; ++i) {
        visit<T>(v.kind[i], [&](auto tag) {
          using S = ATTNRES_STORAGE(tag);
          const S* a = static_cast<const S*>(v.ptr[i]) + t0 * d;
          for (int64_t j = 0; j < m; ++j)
            std::tie(ss[j * L + i], sq[j * L + i]) = dots<T>(a + j * d, q, d, true, t0 + j + 1 < end);
        });
      }
      for (int64_t j = 0; j < m; ++j) {
        const int64_t t = t0 + j;
        key_stats<T>(ss.data() + j * L, sq.data() + j * L, L, d, e);  // ss -> r, sq -> s, all sources at once
        token_softmax<T>(ss.data() + j * L, sq.data() + j * L, L, n, t, s, r, p);
        T* o = h.data();
        if constexpr (same) {
          if (!w) o = out + t * d;
        }
        mix(v, t * d, p + t, n, d, o);
        output_row<T, O>(out, o, w, e, d, t, rh);
      }
    }
  });
}

// The gradients of one token's sources of kind k (storage S), 2 W<T> features from ``off``:
// o_i = p_i dh + c1_i q + c2_i x_i where dv[i] (added to o_i's contents where add[i]: a carried source's gradient
// so far, built up in place), and dq += c1_i x_i, with dh, q and dq in registers across the sources. With
// ``ahead``, prefetches the next token's gradient rows for writing (measured: 10-27 % faster).
template <typename T, typename S>
inline void grads_kind(vec<T> (&dq)[2], const vec<T> (&dh)[2], const vec<T> (&q)[2], const Sources<T>& v, int k,
                       const std::vector<void*>& dv, const std::vector<uint8_t>& add, int64_t off, const T* pi,
                       const T* c1, const T* c2, int64_t ahead) {
  for (const int64_t i : v.of[k]) {
    const S* x = static_cast<const S*>(v.ptr[i]) + off;
    const vec<T> x0 = load<T>(x), x1 = load<T>(x + W<T>);
    if (dv[i]) {
      S* o = static_cast<S*>(dv[i]) + off;
      if (ahead) {
        __builtin_prefetch(o + ahead, 1);
        if constexpr (sizeof(S) == 4) __builtin_prefetch(o + ahead + W<T>, 1);
      }
      vec<T> g0 = pi[i] * dh[0] + c1[i] * q[0] + c2[i] * x0, g1 = pi[i] * dh[1] + c1[i] * q[1] + c2[i] * x1;
      if (add[i]) {
        g0 += load<T>(o);
        g1 += load<T>(o + W<T>);
      }
      store<T>(o, g0);
      store<T>(o + W<T>, g1);
    }
    dq[0] += c1[i] * x0;
    dq[1] += c1[i] * x1;
  }
}

// All sources' gradients of one token (rows at ``off``) and its share of dq (if dq): blocks of 2 W<T> features,
// each source row loaded once per block; coefficients pi, c1, c2 per source.
template <typename T>
void token_grads(const Sources<T>& v, const std::vector<void*>& dv, const std::vector<uint8_t>& add, int64_t off,
                 const T* dh, const T* q, const T* pi, const T* c1, const T* c2, T* dq, int64_t d, bool ahead) {
  const int64_t w = W<T>, full = d - d % (2 * w), pf = ahead ? d : 0;
  for (int64_t k = 0; k < full; k += 2 * w) {
    const vec<T> h[2] = {load<T>(dh + k), load<T>(dh + k + w)}, qv[2] = {load<T>(q + k), load<T>(q + k + w)};
    vec<T> a[2] = {};
    grads_kind<T, T>(a, h, qv, v, 0, dv, add, off + k, pi, c1, c2, pf);
    if constexpr (std::is_same_v<T, float>) {
      grads_kind<T, bf16>(a, h, qv, v, 1, dv, add, off + k, pi, c1, c2, pf);
      grads_kind<T, f16>(a, h, qv, v, 2, dv, add, off + k, pi, c1, c2, pf);
    }
    if (dq) {
      store<T>(dq + k, load<T>(dq + k) + a[0]);
      store<T>(dq + k + w, load<T>(dq + k + w) + a[1]);
    }
  }
  for (int64_t i = 0; i < v.size() && full < d; ++i) {
    visit<T>(v.kind[i], [&](auto tag) {
      using S = ATTNRES_STORAGE(tag);
      const S* x = static_cast<const S*>(v.ptr[i]) + off;
      S* o = dv[i] ? static_cast<S*>(dv[i]) + off : nullptr;
      for (int64_t k = full; k < d; ++k) {
        const T xk = up<T>(x[k]);
        if (o) o[k] = down<S>(pi[i] * dh[k] + c1[i] * q[k] + c2[i] * xk + (add[i] ? up<T>(o[k]) : T(0)));
        if (dq) dq[k] += c1[i] * xk;
      }
    });
  }
}

// Back through the output norm y = h * rr * w: h (in, overwritten by h * rr) and g = dy give dh = rr * (g * w -
// h rr <h rr, g * w> / d), and dw += g * h * rr. Plain pointer arguments (not lambda captures), so the loops
// load w with vector loads instead of re-reading the captured pointer per element (a gather).
template <typename T>
inline void norm_grad(T* __restrict h, const T* __restrict g, const T* __restrict w, T rr, int64_t d,
                      T* __restrict dh, T* __restrict dw) {
  T c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t k = 0; k < d; ++k) {
    h[k] *= rr;
    c += h[k] * g[k] * w[k];
  }
  c /= d;
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) dh[k] = rr * (g[k] * w[k] - h[k] * c);
  if (dw) {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) dw[k] += g[k] * h[k];
  }
}

template <typename T, typename O>
void backward_impl(const T* q, const T* w, const Sources<T>& v, int64_t n, int64_t d, const T* s, const T* r,
                   const T* p, const T* rh, const O* dy, const T* dp_out, const std::vector<void*>& dv,
                   const std::vector<uint8_t>& add, T* dq_parts, T* dw_parts) {
  const int64_t L = v.size();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    constexpr bool same = std::is_same_v<O, T>;
    const int64_t tid = at::get_thread_num();
    T* dq = dq_parts ? dq_parts + tid * d : nullptr;
    T* dw = dw_parts ? dw_parts + tid * d : nullptr;
    std::vector<T> gb(same ? 0 : d), hn(w ? d : 0), dhb(w ? d : 0), dp(L), pi(L), c1(L), c2(L);
    for (int64_t t = begin; t < end; ++t) {
      if (t + 1 < end) prefetch_row(dy + (t + 1) * d, d * sizeof(O));  // the next token's dy (measured: ~8 %)
      prefetch_stats(t, end, n, L, s, r, p);
      const T* g;
      if constexpr (same) {
        g = dy + t * d;
      } else {
        const O* gy = dy + t * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) gb[k] = up<T>(gy[k]);
        g = gb.data();
      }
      const T* dh = g;
      if (w) {  // through the output norm: h recomputed from the sources
        const T rr = rh[t];
        mix(v, t * d, p + t, n, d, hn.data(), t + 1 < end);  // the first read of this token's rows
        norm_grad<T>(hn.data(), g, w, rr, d, dhb.data(), dw);
        dh = dhb.data();
      }
      T mean = 0;
      for (int64_t i = 0; i < L; ++i) {
        visit<T>(v.kind[i], [&](auto tag) {
          using S = ATTNRES_STORAGE(tag);
          dp[i] = dots<T>(static_cast<const S*>(v.ptr[i]) + t * d, dh, d, false).second +
                  (dp_out ? dp_out[i * n + t] : T(0));
        });
        mean += p[i * n + t] * dp[i];
      }
      for (int64_t i = 0; i < L; ++i) {
        const T ri = r[i * n + t];
        pi[i] = p[i * n + t];
        const T ds = pi[i] * (dp[i] - mean);
        c1[i] = ds * ri;
        c2[i] = -ds * s[i * n + t] * ri * ri / d;
      }
      token_grads<T>(v, dv, add, t * d, dh, q, pi.data(), c1.data(), c2.data(), dq, d, t + 1 < end);
    }
  });
}

// Phase 1 of two-phase Block AttnRes (attnres/ops/two_phase.py): nq folded queries q [nq, D] against the
// n completed blocks, one read of each block row: its key rstd r [n, N], the logits s [nq, n, N], and per
// query the online-softmax statistics m, l [nq, N] and the un-normalised mix o [nq, N, D] (all in T).
template <typename T>
void phase1_impl(const T* q, int64_t nq, double eps, const Sources<T>& v, int64_t N, int64_t d, T* s, T* r, T* o,
                 T* m, T* l) {
  const int64_t n = v.size();
  const T e = static_cast<T>(eps);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> ex(nq * n);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < n; ++i) {
        visit<T>(v.kind[i], [&](auto tag) {
          using S = ATTNRES_STORAGE(tag);
          const S* row = static_cast<const S*>(v.ptr[i]) + t * d;
          T ri = 0;
          for (int64_t j = 0; j < nq; ++j) {  // the row stays in cache across the queries
            const auto [ss, sq] = dots<T>(row, q + j * d, d, j == 0, j == 0 && t + 1 < end);
            if (j == 0) r[i * N + t] = ri = T(1) / std::sqrt(ss / d + e);
            s[(j * n + i) * N + t] = sq * ri;
          }
        });
      }
      for (int64_t j = 0; j < nq; ++j) {
        T mj = -INFINITY, lj = 0;
        for (int64_t i = 0; i < n; ++i) mj = std::max(mj, s[(j * n + i) * N + t]);
        for (int64_t i = 0; i < n; ++i) lj += (ex[j * n + i] = std::exp(s[(j * n + i) * N + t] - mj));
        m[j * N + t] = mj;
        l[j * N + t] = lj;
        mix(v, t * d, ex.data() + j * n, 1, d, o + (j * N + t) * d);
      }
    }
  });
}

// Phase 2, the merged read of one query: the phase-1 statistics of the completed blocks (s1, r1 [nb, N],
// o1 [N, D], m1, l1 [N]) merged with the partial sum sources[nb] (if given) by an online-softmax update:
//   big = max(m1, s_p),  h = (e^{m1-big} o1 + e^{s_p-big} v_p) / (e^{m1-big} l1 + e^{s_p-big}),
// then the optional output norm. Writes the joint read's statistics s, r, p [L, N] (L = nb or nb + 1)
// and rh, so its backward is the joint read's.
template <typename T, typename O>
void merge_impl(const T* q, const T* w, double eps, const Sources<T>& v, int64_t nb, int64_t N, int64_t d,
                const T* s1, const T* r1, const T* o1, const T* m1, const T* l1, O* out, T* s, T* r, T* p, T* rh) {
  const bool partial = v.size() > nb;
  const T e = static_cast<T>(eps);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    constexpr bool same = std::is_same_v<O, T>;
    std::vector<T> hb(w || !same ? d : 0);
    for (int64_t t = begin; t < end; ++t) {
      T* h = hb.data();
      if constexpr (same) {
        if (!w) h = out + t * d;
      }
      const T* x1 = o1 + t * d;
      T big = m1[t], z = l1[t];
      if (partial) {
        visit<T>(v.kind[nb], [&](auto tag) {
          using S = ATTNRES_STORAGE(tag);
          const S* x = static_cast<const S*>(v.ptr[nb]) + t * d;
          const auto [ss, sq] = dots<T>(x, q, d, true, t + 1 < end);
          const T rp = T(1) / std::sqrt(ss / d + e), sp = sq * rp;
          s[nb * N + t] = sp;
          r[nb * N + t] = rp;
          big = std::max(m1[t], sp);
          const T a = std::exp(m1[t] - big), b = std::exp(sp - big);
          z = a * l1[t] + b;
          const T ca = a / z, cb = b / z;
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) h[k] = x1[k] * ca + up<T>(x[k]) * cb;
          p[nb * N + t] = std::exp(sp - big) / z;
        });
      } else {
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) h[k] = x1[k] / z;
      }
      for (int64_t i = 0; i < nb; ++i) {
        s[i * N + t] = s1[i * N + t];
        r[i * N + t] = r1[i * N + t];
        p[i * N + t] = std::exp(s1[i * N + t] - big) / z;
      }
      output_row<T, O>(out, h, w, e, d, t, rh);
    }
  });
}

// ---- a pool of the read's large outputs (o and the source gradients) ----
// A fresh multi-megabyte tensor comes from mmap, so its first write pays a page fault per 4 KiB page:
// measured, most of the gap between the forward read and a copy. Freed outputs of at least kPoolMin
// bytes are kept here (the storage's deleter returns them; nothing is reused while a tensor holds it)
// and handed to the next output of the same byte size, up to a limit of cached bytes (oldest freed
// first out). Only this file's tensors use it; the process allocator is untouched.
constexpr size_t kPoolMin = size_t(1) << 18;
constexpr size_t kAlign = 64;

struct Pool {
  std::mutex mu;
  std::deque<std::pair<size_t, void*>> free;  // (bytes, ptr), oldest first
  size_t cached = 0;
  std::atomic<size_t> limit{size_t(1) << 30};
  std::atomic<bool> bypass{false};  // new outputs take fresh memory (benchmarks); the cache is kept
  int64_t hits = 0, misses = 0;

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> g(mu);
      for (auto it = free.rbegin(); it != free.rend(); ++it) {
        if (it->first == bytes) {
          void* p = it->second;
          free.erase(std::next(it).base());
          cached -= bytes;
          ++hits;
          return p;
        }
      }
      ++misses;
    }
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kAlign, bytes) == 0, "attnres read: out of memory allocating ", bytes, " bytes");
    return p;
  }

  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> g(mu);
      free.emplace_back(bytes, p);
      cached += bytes;
    }
    trim();
  }

  void set_limit(size_t bytes) {
    limit = bytes;
    trim();
  }

  // Frees the oldest cached buffers until the cache fits the limit.
  void trim() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu);
      while (cached > limit) {
        drop.push_back(free.front().second);
        cached -= free.front().first;
        free.pop_front();
      }
    }
    for (void* q : drop) std::free(q);
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may be freed after static destructors ran
  return *p;
}

// An uninitialised contiguous tensor of `sizes`, from the pool when it is large.
Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  if (bytes < kPoolMin || pool().limit == 0 || pool().bypass) return at::empty(sizes, opts);
  void* p = pool().take(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { pool().give(q, bytes); }, opts);
}

// f(T{}, O{}) for the compute type of qp and the output (promoted source) dtype.
template <typename F>
void dispatch(at::ScalarType ct, at::ScalarType out, F&& f) {
  if (ct == at::kDouble) {
    f(double{}, double{});
  } else if (out == at::kBFloat16) {
    f(float{}, bf16{});
  } else if (out == at::kHalf) {
    f(float{}, f16{});
  } else {
    f(float{}, float{});
  }
}

at::ScalarType promoted(at::TensorList sources) {
  at::ScalarType out = sources[0].scalar_type();
  for (const auto& v : sources) out = c10::promoteTypes(out, v.scalar_type());
  return out;
}

// Whether the kernels with compute type ct read and write st (float32/bfloat16/float16 with float32, float64
// with float64): the output and its gradient dy.
bool io_dtype(at::ScalarType ct, at::ScalarType st) {
  return ct == at::kDouble ? st == at::kDouble : kind_of<float>(st) >= 0;
}

// The output dtype: ``dtype`` if given, else the sources' promoted dtype.
at::ScalarType out_dtype(at::ScalarType ct, at::TensorList sources, std::optional<at::ScalarType> dtype) {
  const at::ScalarType ot = dtype.value_or(promoted(sources));
  TORCH_CHECK(io_dtype(ct, ot), "attnres read: output dtype ", ot, " is not allowed with a ", ct,
              " qp (float32/bfloat16/float16 with float32, float64 with float64)");
  return ot;
}

void check(const Tensor& qp, const std::optional<Tensor>& w, at::TensorList sources) {
  TORCH_CHECK(!sources.empty(), "attnres read: need at least one source");
  TORCH_CHECK(qp.dim() == 1 && qp.size(0) > 0 && qp.is_contiguous() && qp.device().is_cpu() &&
                  (qp.scalar_type() == at::kFloat || qp.scalar_type() == at::kDouble),
              "attnres read: qp must be a contiguous CPU float32/float64 [D], D > 0");
  TORCH_CHECK(!w || (w->device().is_cpu() && w->is_contiguous() && w->scalar_type() == qp.scalar_type() &&
                     w->numel() == qp.numel()),
              "attnres read: w must be a contiguous CPU [D] of qp's dtype");
  const bool f64 = qp.scalar_type() == at::kDouble;
  for (const auto& v : sources) {
    const int k = f64 ? kind_of<double>(v.scalar_type()) : kind_of<float>(v.scalar_type());
    TORCH_CHECK(v.device().is_cpu() && v.is_contiguous() && k >= 0 && v.numel() == sources[0].numel() &&
                    v.dim() >= 1 && v.size(-1) == qp.size(0),
                "attnres read: sources must be contiguous CPU tensors of one shape [..., D], float32/bfloat16/float16 "
                "with a float32 qp or float64 with a float64 qp");
  }
}

// Returns (o, s, r, p, rh); o in ``dtype`` (default the sources' promoted dtype), the rest in qp's; rh is empty
// without w.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> read_forward(const Tensor& qp, const std::optional<Tensor>& w,
                                                                double eps, at::TensorList sources,
                                                                std::optional<at::ScalarType> dtype) {
  check(qp, w, sources);
  const int64_t d = qp.size(0), n = sources[0].numel() / d, L = sources.size();
  const at::ScalarType ot = out_dtype(qp.scalar_type(), sources, dtype);
  auto out = pooled_empty(sources[0].sizes(), sources[0].options().dtype(ot));
  auto opts = qp.options();
  auto s = at::empty({L, n}, opts), r = at::empty({L, n}, opts), p = at::empty({L, n}, opts);
  auto rh = at::empty({w ? n : 0}, opts);
  dispatch(qp.scalar_type(), ot, [&](auto t_, auto o_) {
    using T = decltype(t_);
    using O = decltype(o_);
    forward_impl<T, O>(qp.data_ptr<T>(), w ? w->data_ptr<T>() : nullptr, eps, gather<T>(sources), n, d,
                       static_cast<O*>(out.data_ptr()), s.data_ptr<T>(), r.data_ptr<T>(), p.data_ptr<T>(),
                       w ? rh.data_ptr<T>() : nullptr);
  });
  return {out, s, r, p, rh};
}

// The L rows of a contiguous bank [L, ..., D] as sources, without a tensor per row.
template <typename T>
Sources<T> rows(const Tensor& bank) {
  Sources<T> v;
  const int k = kind_of<T>(bank.scalar_type());
  const auto* base = static_cast<const char*>(bank.data_ptr());
  const int64_t step = bank.stride(0) * bank.element_size();
  for (int64_t i = 0; i < bank.size(0); ++i) {
    v.ptr.push_back(base + i * step);
    v.kind.push_back(k);
    v.of[k].push_back(i);
  }
  return v;
}

// The forward output only, for inference (cached decode): the sources are the rows of a contiguous bank
// [L, ..., D]. The gain w may be in any float dtype (used in T) and the output is written in ``dtype``
// (default the bank's), so a bf16 model reading an fp32 bank pays no cast either side.
Tensor read_stacked(const Tensor& qp, const std::optional<Tensor>& w_in, double eps, const Tensor& bank,
                    std::optional<at::ScalarType> dtype) {
  const at::ScalarType ct = qp.scalar_type();
  TORCH_CHECK(bank.dim() >= 2 && bank.is_contiguous() && bank.size(0) >= 1 && bank.device().is_cpu(),
              "attnres read: bank must be a contiguous CPU [L, ..., D] with L >= 1, got ", bank.sizes());
  const at::ScalarType ot = out_dtype(ct, bank, dtype);
  std::optional<Tensor> w;
  if (w_in) {
    TORCH_CHECK(w_in->is_floating_point(), "attnres read: w must be floating point, got ", w_in->scalar_type());
    w = w_in->to(ct);  // the gain in any float dtype, used in T
  }
  check(qp, w, bank);  // the bank as one source: its dtype, contiguity and D
  const int64_t L = bank.size(0), d = qp.size(0), n = bank.numel() / (L * d);
  auto out = pooled_empty(bank.sizes().slice(1), bank.options().dtype(ot));
  dispatch(ct, ot, [&](auto t_, auto o_) {
    using T = decltype(t_);
    using O = decltype(o_);
    std::vector<T> stats(3 * L * n + n);  // s, r, p and rh: not kept
    T* st = stats.data();
    forward_impl<T, O>(qp.data_ptr<T>(), w ? w->data_ptr<T>() : nullptr, eps, rows<T>(bank), n, d,
                       static_cast<O*>(out.data_ptr()), st, st + L * n, st + 2 * L * n, w ? st + 3 * L * n : nullptr);
  });
  return out;
}

// Phase 1: (s [nq, n, N], r [n, N], o [nq, N, D], m [nq, N], l [nq, N]) in qs's dtype.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> phase1(const Tensor& qs, double eps, at::TensorList blocks) {
  TORCH_CHECK(qs.dim() == 2 && qs.size(0) > 0, "attnres phase1: qs must be [S, D] with S > 0");
  check(qs[0], std::nullopt, blocks);
  TORCH_CHECK(qs.is_contiguous(), "attnres phase1: qs must be contiguous");
  const int64_t nq = qs.size(0), d = qs.size(1), N = blocks[0].numel() / d, n = blocks.size();
  auto opts = qs.options();
  auto s = at::empty({nq, n, N}, opts), r = at::empty({n, N}, opts), o = at::empty({nq, N, d}, opts);
  auto m = at::empty({nq, N}, opts), l = at::empty({nq, N}, opts);
  dispatch(qs.scalar_type(), qs.scalar_type(), [&](auto t_, auto) {
    using T = decltype(t_);
    phase1_impl<T>(qs.data_ptr<T>(), nq, eps, gather<T>(blocks), N, d, s.data_ptr<T>(), r.data_ptr<T>(),
                   o.data_ptr<T>(), m.data_ptr<T>(), l.data_ptr<T>());
  });
  return {s, r, o, m, l};
}

// The merged read: (o, s, r, p, rh) as read_forward returns them over the same sources (the nb completed
// blocks of s1, then the partial sum if there is one).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> merge_forward(
    const Tensor& qp, const std::optional<Tensor>& w, double eps, const Tensor& s1_in, const Tensor& r1_in,
    const Tensor& o1_in, const Tensor& m1_in, const Tensor& l1_in, at::TensorList sources,
    std::optional<at::ScalarType> dtype) {
  check(qp, w, sources);
  const int64_t d = qp.size(0), N = sources[0].numel() / d, L = sources.size(), nb = s1_in.size(0);
  const at::ScalarType ct = qp.scalar_type(), ot = out_dtype(ct, sources, dtype);
  TORCH_CHECK(s1_in.dim() == 2 && (L == nb || L == nb + 1), "attnres merge: ", L,
              " sources for the phase-1 statistics of ", nb, " blocks");
  const Tensor s1 = s1_in.to(ct).contiguous(), r1 = r1_in.to(ct).contiguous(), o1 = o1_in.to(ct).contiguous();
  const Tensor m1 = m1_in.to(ct).contiguous(), l1 = l1_in.to(ct).contiguous();
  TORCH_CHECK(s1.numel() == nb * N && r1.numel() == nb * N && o1.numel() == N * d && m1.numel() == N &&
                  l1.numel() == N,
              "attnres merge: phase-1 statistics s ", s1.sizes(), ", r ", r1.sizes(), ", o ", o1.sizes(), ", m ",
              m1.sizes(), ", l ", l1.sizes(), " do not fit ", nb, " blocks of ", N, " tokens of ", d);
  auto out = pooled_empty(sources[0].sizes(), sources[0].options().dtype(ot));
  auto opts = qp.options();
  auto s = at::empty({L, N}, opts), r = at::empty({L, N}, opts), p = at::empty({L, N}, opts);
  auto rh = at::empty({w ? N : 0}, opts);
  dispatch(ct, ot, [&](auto t_, auto o_) {
    using T = decltype(t_);
    using O = decltype(o_);
    merge_impl<T, O>(qp.data_ptr<T>(), w ? w->data_ptr<T>() : nullptr, eps, gather<T>(sources), nb, N, d,
                     s1.data_ptr<T>(), r1.data_ptr<T>(), o1.data_ptr<T>(), m1.data_ptr<T>(), l1.data_ptr<T>(),
                     static_cast<O*>(out.data_ptr()), s.data_ptr<T>(), r.data_ptr<T>(), p.data_ptr<T>(),
                     w ? rh.data_ptr<T>() : nullptr);
  });
  return {out, s, r, p, rh};
}

// The backward into given gradient tensors: dv[i] (undefined where source i needs none) gets source i's gradient,
// added to its contents where add[i]. Returns (dqp or [0], dw or [0]).
std::tuple<Tensor, Tensor> backward_into(const Tensor& qp, const std::optional<Tensor>& w, const Tensor& s_in,
                                         const Tensor& r_in, const Tensor& p_in, const Tensor& rh_in,
                                         const Tensor& dy_in, const std::optional<Tensor>& dp_out_in,
                                         at::TensorList sources, bool need_dq, bool need_dw,
                                         const std::vector<Tensor>& dv_t, const std::vector<uint8_t>& add) {
  check(qp, w, sources);
  const int64_t d = qp.size(0), n = sources[0].numel() / d, L = sources.size();
  const at::ScalarType ct = qp.scalar_type();
  // dy in its own dtype where the kernel reads it (the output's, whichever was asked for), else the promoted one.
  const at::ScalarType ot = io_dtype(ct, dy_in.scalar_type()) ? dy_in.scalar_type() : promoted(sources);
  // A compiled graph may hand over the saved statistics in another layout: make them [L, N] / [N] in T.
  const Tensor dy = dy_in.to(ot).contiguous();
  const Tensor s = s_in.to(ct).contiguous(), r = r_in.to(ct).contiguous(), p = p_in.to(ct).contiguous();
  const Tensor rh = rh_in.to(ct).contiguous();
  TORCH_CHECK(dy.numel() == n * d, "attnres read: dy has ", dy.numel(), " elements, expected ", n * d);
  TORCH_CHECK(s.numel() == L * n && r.numel() == L * n && p.numel() == L * n && (!w || rh.numel() == n),
              "attnres read: statistics s, r, p ", s.sizes(), r.sizes(), p.sizes(), " and rh ", rh.sizes(),
              " do not fit ", L, " sources of ", n, " tokens");
  std::optional<Tensor> dp_out;
  if (dp_out_in) dp_out = dp_out_in->to(ct).contiguous();
  TORCH_CHECK(!dp_out || dp_out->numel() == L * n, "attnres read: bad dp_out");
  std::vector<void*> dv(L, nullptr);
  for (int64_t i = 0; i < L; ++i) {
    if (!dv_t[i].defined()) continue;
    const Tensor& g = dv_t[i];
    TORCH_CHECK(g.device().is_cpu() && g.is_contiguous() && g.scalar_type() == sources[i].scalar_type() &&
                    g.numel() == sources[i].numel(),
                "attnres read: the gradient buffer of source ", i, " must be a contiguous CPU tensor of its dtype (",
                sources[i].scalar_type(), ") and size ", sources[i].sizes(), ", got ", g.scalar_type(), " ",
                g.sizes(), g.is_contiguous() ? "" : " (not contiguous)");
    dv[i] = g.data_ptr();
  }
  const int64_t threads = at::get_num_threads();
  auto opts = qp.options();
  auto dq_parts = at::zeros({need_dq ? threads : 0, d}, opts);
  auto dw_parts = at::zeros({need_dw && w ? threads : 0, d}, opts);
  dispatch(ct, ot, [&](auto t_, auto o_) {
    using T = decltype(t_);
    using O = decltype(o_);
    backward_impl<T, O>(qp.data_ptr<T>(), w ? w->data_ptr<T>() : nullptr, gather<T>(sources), n, d,
                        s.data_ptr<T>(), r.data_ptr<T>(), p.data_ptr<T>(), w ? rh.data_ptr<T>() : nullptr,
                        static_cast<const O*>(dy.data_ptr()), dp_out ? dp_out->data_ptr<T>() : nullptr, dv, add,
                        need_dq ? dq_parts.data_ptr<T>() : nullptr, need_dw && w ? dw_parts.data_ptr<T>() : nullptr);
  });
  Tensor dq = need_dq ? dq_parts.sum(0) : at::empty({0}, opts);
  Tensor dw = need_dw && w ? dw_parts.sum(0) : at::empty({0}, opts);
  return {dq, dw};
}

// Returns (dqp or [0], dw or [0], the gradients of the sources with need_dv[i], in order). acc (eager, or empty):
// each source's gradient so far from later reads (None where none came), which the backward owns: its gradient
// is added into it in place (a copy if it is not a contiguous tensor of the source's dtype) and returned.
std::tuple<Tensor, Tensor, std::vector<Tensor>> read_backward(
    const Tensor& qp, const std::optional<Tensor>& w, const Tensor& s, const Tensor& r, const Tensor& p,
    const Tensor& rh, const Tensor& dy, const std::optional<Tensor>& dp_out, at::TensorList sources, bool need_dq,
    bool need_dw, const c10::List<bool>& need_dv, const std::vector<std::optional<Tensor>>& acc = {}) {
  const int64_t L = sources.size();
  TORCH_CHECK(static_cast<int64_t>(need_dv.size()) == L, "attnres read: need_dv must have one flag per source");
  TORCH_CHECK(acc.empty() || static_cast<int64_t>(acc.size()) == L,
              "attnres read: acc must be empty or have one entry per source, got ", acc.size(), " for ", L);
  std::vector<Tensor> dv(L), grads;
  std::vector<uint8_t> add(L, 0);
  for (int64_t i = 0; i < L; ++i) {
    if (!need_dv.get(i)) continue;
    const Tensor& v = sources[i];
    if (!acc.empty() && acc[i]) {
      TORCH_CHECK(acc[i]->numel() == v.numel(), "attnres read: the gradient so far ", acc[i]->sizes(),
                  " does not fit its source ", v.sizes());
      dv[i] = acc[i]->to(v.scalar_type()).contiguous().view(v.sizes());
      add[i] = 1;
    } else {
      dv[i] = pooled_empty(v.sizes(), v.options());
    }
    grads.push_back(dv[i]);
  }
  auto [dq, dw] = backward_into(qp, w, s, r, p, rh, dy, dp_out, sources, need_dq, need_dw, dv, add);
  return {dq, dw, grads};
}

// One zero-stride carrier per source, shaped and typed like it (grads.py: a carried source's gradient so far
// comes back as its carrier's gradient).
std::vector<Tensor> carriers(at::TensorList sources) {
  std::vector<Tensor> out;
  for (const auto& v : sources) out.push_back(at::zeros({}, v.options()).expand(v.sizes()));
  return out;
}

using Read = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, std::vector<Tensor>>;

Read with_carriers(std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> res, at::TensorList sources, bool carried) {
  auto [o, s, r, p, rh] = std::move(res);
  return {o, s, r, p, rh, carried ? carriers(sources) : std::vector<Tensor>{}};
}

// The ops' CPU kernels (schemas in cpu_kernel.py): the carry inputs only link the autograd graph.
Read read_forward_op(const Tensor& qp, const std::optional<Tensor>& w, double eps, at::TensorList sources,
                     std::optional<at::ScalarType> dtype, std::optional<at::TensorList> carry) {
  return with_carriers(read_forward(qp, w, eps, sources, dtype), sources, carry.has_value());
}

Read merge_forward_op(const Tensor& qp, const std::optional<Tensor>& w, double eps, const Tensor& s1,
                      const Tensor& r1, const Tensor& o1, const Tensor& m1, const Tensor& l1, at::TensorList sources,
                      std::optional<at::ScalarType> dtype, std::optional<at::TensorList> carry) {
  return with_carriers(merge_forward(qp, w, eps, s1, r1, o1, m1, l1, sources, dtype), sources, carry.has_value());
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> read_backward_op(
    const Tensor& qp, const std::optional<Tensor>& w, const Tensor& s, const Tensor& r, const Tensor& p,
    const Tensor& rh, const Tensor& dy, const std::optional<Tensor>& dp_out, at::TensorList sources, bool need_dq,
    bool need_dw, c10::List<bool> need_dv) {
  return read_backward(qp, w, s, r, p, rh, dy, dp_out, sources, need_dq, need_dw, need_dv);
}

// attnres::read_backward_into: the gradient of each source with need_dv[i] written into the next of ``grads``
// (mutated), added to its contents where the matching ``add`` is set (a carried read's gradients so far).
std::tuple<Tensor, Tensor> read_backward_into_op(
    const Tensor& qp, const std::optional<Tensor>& w, const Tensor& s, const Tensor& r, const Tensor& p,
    const Tensor& rh, const Tensor& dy, const std::optional<Tensor>& dp_out, at::TensorList sources, bool need_dq,
    bool need_dw, c10::List<bool> need_dv, at::TensorList grads, c10::List<bool> add) {
  const int64_t L = sources.size();
  TORCH_CHECK(static_cast<int64_t>(need_dv.size()) == L, "attnres read: need_dv must have one flag per source");
  TORCH_CHECK(grads.size() == add.size(), "attnres read: ", grads.size(), " gradient buffers but ", add.size(),
              " add flags");
  std::vector<Tensor> dv(L);
  std::vector<uint8_t> adds(L, 0);
  size_t k = 0;
  for (int64_t i = 0; i < L; ++i) {
    if (!need_dv.get(i)) continue;
    TORCH_CHECK(k < grads.size(), "attnres read: fewer gradient buffers (", grads.size(),
                ") than sources that need a gradient");
    dv[i] = grads[k];
    adds[i] = add.get(k);
    ++k;
  }
  TORCH_CHECK(k == grads.size(), "attnres read: ", grads.size(), " gradient buffers for ", k,
              " sources that need a gradient");
  return backward_into(qp, w, s, r, p, rh, dy, dp_out, sources, need_dq, need_dw, dv, adds);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnres, CPU, m) {
  m.impl("read_forward", TORCH_FN(read_forward_op));
  m.impl("read_stacked", TORCH_FN(read_stacked));
  m.impl("read_backward", TORCH_FN(read_backward_op));
  m.impl("read_backward_into", TORCH_FN(read_backward_into_op));
  m.impl("phase1", TORCH_FN(phase1));
  m.impl("merge_forward", TORCH_FN(merge_forward_op));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("read_forward",
        [](const Tensor& qp, const std::optional<Tensor>& w, double eps, const std::vector<Tensor>& sources,
           std::optional<at::ScalarType> dtype) { return read_forward(qp, w, eps, sources, dtype); },
        "AttnRes read forward (CPU): (o, s, r, p, rh)");
  m.def("read_forward_stacked", &read_stacked, "AttnRes read forward over a stacked bank (CPU): o in dtype");
  m.def("read_backward",
        [](const Tensor& qp, const std::optional<Tensor>& w, const Tensor& s, const Tensor& r, const Tensor& p,
           const Tensor& rh, const Tensor& dy, const std::optional<Tensor>& dp_out, const std::vector<Tensor>& sources,
           bool need_dq, bool need_dw, const std::vector<bool>& need_dv,
           const std::vector<std::optional<Tensor>>& acc) {
          c10::List<bool> flags;
          for (const bool b : need_dv) flags.push_back(b);
          return read_backward(qp, w, s, r, p, rh, dy, dp_out, sources, need_dq, need_dw, flags, acc);
        },
        "AttnRes read backward (CPU): (dqp or [0], dw or [0], [grads of the sources that need one]); acc (or "
        "empty): each source's gradient so far (or None), owned by the caller, added into in place and returned");
  m.def("phase1",
        [](const Tensor& qs, double eps, const std::vector<Tensor>& blocks) { return phase1(qs, eps, blocks); },
        "Two-phase Block AttnRes, phase 1 (CPU): (s, r, o, m, l)");
  m.def("merge_forward",
        [](const Tensor& qp, const std::optional<Tensor>& w, double eps, const Tensor& s1, const Tensor& r1,
           const Tensor& o1, const Tensor& m1, const Tensor& l1, const std::vector<Tensor>& sources,
           std::optional<at::ScalarType> dtype) { return merge_forward(qp, w, eps, s1, r1, o1, m1, l1, sources, dtype); },
        "Two-phase Block AttnRes, the merged read forward (CPU): (o, s, r, p, rh)");
  m.def("parallel_width",
        [](int64_t n) {
          std::atomic<int64_t> most{0};
          at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
            int64_t t = at::get_thread_num() + 1, seen = most.load();
            while (t > seen && !most.compare_exchange_weak(seen, t)) {
            }
          });
          return most.load();
        },
        "How many threads at::parallel_for uses over n items (1 when built without OpenMP)");
  m.def("pool_set_limit", [](int64_t bytes) { pool().set_limit(static_cast<size_t>(std::max<int64_t>(bytes, 0))); },
        "Cap the bytes of freed outputs kept for reuse (0: keep none, free every output)");
  m.def("pool_bypass", [](bool on) { pool().bypass = on; }, "New outputs take fresh memory (the cache is kept)");
  m.def("pool_stats",
        []() {
          std::lock_guard<std::mutex> g(pool().mu);
          return std::make_tuple(static_cast<int64_t>(pool().cached), static_cast<int64_t>(pool().limit.load()),
                                 pool().hits, pool().misses);
        },
        "(cached bytes, limit bytes, hits, misses) of the output pool");
}
