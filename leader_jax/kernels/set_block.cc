// LEADER(S) inference kernel: one pre-LN transformer block over many small code sets, averaged per set.
//
// XLA:CPU runs the student's per-set attention as thousands of tiny batched matmuls and spends most of
// its time in per-matrix overhead; this CPU-only XLA FFI handler computes each set in cache instead.
//
// Inputs: rows [N, 4d] = x | q | k | v per row (q/k/v = LN1(x) @ Wqkv, done by the caller; for code
// sets these are per-vocabulary tables), idx [T] row of each token, starts [S] and counts [S] (set s =
// rows idx[starts[s] .. starts[s] + counts[s])), Wo [d, d], bo [d], LN2 scale/bias [d], W1 [d, Fp],
// b1 [Fp], W2 [Fp, d], b2 [d] (Fp = FFN width rounded up to 16, zero padded). Output [S, d]: per set
// the mean over its tokens of the block output x1 + W2·g + b2 (x1 = x + attention·Wo + bo, g =
// GELU_tanh(LN2(x1)·W1 + b1)), computed as mean(x1) + W2·mean(g) + b2 (exact: W2 is linear), so W2
// runs once per set. Empty sets give zeros. Attributes: heads, eps, threads.
//
// Numerics: float32 throughout, like the XLA path; tanh is Eigen's rational approximation (what XLA:CPU
// also uses), so results match the XLA forward pass to float rounding (tests assert 1e-5).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }
inline v16 splat(float a) { return v16{} + a; }

// Eigen's ptanh_float rational approximation (odd degree-13 / even degree-6) on [-c, c].
inline v16 tanh16(v16 x) {
  const v16 c = splat(7.90531110763549805f);
  x = x > c ? c : x;
  x = x < -c ? -c : x;
  const v16 x2 = x * x;
  v16 p = splat(-2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  v16 q = splat(1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
}

inline v16 gelu16(v16 x) {  // jax.nn.gelu(approximate=True)
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + tanh16(k * (x + 0.044715f * x * x * x)));
}

typedef int32_t vi16 __attribute__((vector_size(64)));

// Cephes expf on 16 lanes (x <= 88; x < -87.3 is clamped, so callers zero masked lanes themselves).
inline v16 exp16(v16 x) {
  const v16 lo = splat(-87.3f), hi = splat(88.3f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v16 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const v16 t = x * 1.44269504088896341f + magic;
  const v16 n = t - magic;
  v16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi16 e = (((vi16)t - (vi16)magic) + 127) << 23;  // 2^n in the exponent bits (vector casts reinterpret)
  return p * (v16)e;
}

// C[MT, 16*NV] += A[MT, K] @ B[K, 16*NV] + bias, register-blocked. With GELU=true the tile's rows are
// instead GELU'd and added into sums[m] (the running sum of g of row m's set; C unused).
template <int MT, int NV, bool GELU>
inline void tile(const float* A, int lda, const float* B, int ldb, const float* bias, float* C, int ldc,
                 int K, float* const* sums) {
  v16 acc[MT][NV];
  for (int v = 0; v < NV; ++v) {
    const v16 b = load(bias + 16 * v);
    for (int m = 0; m < MT; ++m) acc[m][v] = GELU ? b : b + load(C + m * ldc + 16 * v);  // C += A B + bias
  }
  for (int k = 0; k < K; ++k) {
    v16 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + 16 * v);
    for (int m = 0; m < MT; ++m) {
      const float a = A[m * lda + k];
      for (int v = 0; v < NV; ++v) acc[m][v] += a * b[v];
    }
  }
  if (GELU) {
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < NV; ++v) store(sums[m] + 16 * v, load(sums[m] + 16 * v) + gelu16(acc[m][v]));
  } else {
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < NV; ++v) store(C + m * ldc + 16 * v, acc[m][v]);
  }
}

template <int MT, bool GELU>
inline void row_tiles(const float* A, int lda, const float* B, int ldb, const float* bias, float* C,
                      int ldc, int K, int N, float* const* sums) {
  float* sh[MT];
  int n = 0;
  for (; n + 64 <= N; n += 64) {
    if (GELU) for (int m = 0; m < MT; ++m) sh[m] = sums[m] + n;
    tile<MT, 4, GELU>(A, lda, B + n, ldb, bias + n, C + n, ldc, K, sh);
  }
  if (GELU) for (int m = 0; m < MT; ++m) sh[m] = sums[m] + n;
  switch ((N - n) / 16) {
    case 3: tile<MT, 3, GELU>(A, lda, B + n, ldb, bias + n, C + n, ldc, K, sh); break;
    case 2: tile<MT, 2, GELU>(A, lda, B + n, ldb, bias + n, C + n, ldc, K, sh); break;
    case 1: tile<MT, 1, GELU>(A, lda, B + n, ldb, bias + n, C + n, ldc, K, sh); break;
    default: break;
  }
}

constexpr int MT = 6;  // rows per register tile: 6 x 4 accumulators + 4 B vectors fit 32 zmm registers

// C[M, N] += A[M, K] @ B[K, N] + bias (N a multiple of 16); GELU variant: sums[m][:N] += GELU(row m).
template <bool GELU>
void matmul(const float* A, int lda, const float* B, int ldb, const float* bias, float* C, int ldc,
            int M, int K, int N, float* const* sums) {
  int m = 0;
  for (; m + MT <= M; m += MT) row_tiles<MT, GELU>(A + m * lda, lda, B, ldb, bias, C + m * ldc, ldc, K, N, sums + m);
  float* const* sm = sums + m;
  const float* a = A + m * lda;
  float* c = C + m * ldc;
  switch (M - m) {
    case 5: row_tiles<5, GELU>(a, lda, B, ldb, bias, c, ldc, K, N, sm); break;
    case 4: row_tiles<4, GELU>(a, lda, B, ldb, bias, c, ldc, K, N, sm); break;
    case 3: row_tiles<3, GELU>(a, lda, B, ldb, bias, c, ldc, K, N, sm); break;
    case 2: row_tiles<2, GELU>(a, lda, B, ldb, bias, c, ldc, K, N, sm); break;
    case 1: row_tiles<1, GELU>(a, lda, B, ldb, bias, c, ldc, K, N, sm); break;
    default: break;
  }
}

struct Weights {
  const float *rows, *wo, *bo, *ln_s, *ln_b, *w1, *b1, *w2, *b2;
  const int32_t *idx, *starts, *counts;
  int d, heads, fp;
  float eps;
};

// Attention of one set (its n rows copied contiguously to `rows`) into att[n, d] (before Wo), with
// 16 queries in the vector lanes at a time: every score column, the softmax max/sum and the value sums
// are whole-vector operations (no horizontal reductions). qt and e are caller-owned scratch.
void attend(const Weights& w, const float* rows, int n, float* att, std::vector<float>& qt, std::vector<v16>& e) {
  const int d = w.d, hd = d / w.heads, stride = 4 * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  alignas(64) float ot[16];
  qt.resize(static_cast<size_t>(hd) * 16);
  e.resize(n);
  for (int head = 0; head < w.heads; ++head) {
    const int c = head * hd;
    for (int i0 = 0; i0 < n; i0 += 16) {        // a block of up to 16 queries
      const int nq = std::min(16, n - i0);
      std::fill(qt.begin(), qt.end(), 0.0f);    // Q^T of the block, [hd][16]
      for (int i = 0; i < nq; ++i)
        for (int k = 0; k < hd; ++k) qt[k * 16 + i] = rows[static_cast<size_t>(i0 + i) * stride + d + c + k];
      v16 mx = splat(-INFINITY);
      for (int j = 0; j < n; ++j) {             // column j: the block's scores against key j
        const float* kj = rows + static_cast<size_t>(j) * stride + 2 * d + c;
        v16 sj = splat(0.0f);
        for (int k = 0; k < hd; ++k) sj += kj[k] * load(qt.data() + k * 16);
        e[j] = sj * scale;
        mx = mx > e[j] ? mx : e[j];
      }
      v16 tot = splat(0.0f);
      for (int j = 0; j < n; ++j) {
        e[j] = exp16(e[j] - mx);
        tot += e[j];
      }
      const v16 inv = 1.0f / tot;
      for (int k = 0; k < hd; ++k) {            // output dim k for the whole block
        v16 o = splat(0.0f);
        for (int j = 0; j < n; ++j) o += rows[static_cast<size_t>(j) * stride + 3 * d + c + k] * e[j];
        store(ot, o * inv);
        for (int i = 0; i < nq; ++i) att[static_cast<size_t>(i0 + i) * d + c + k] = ot[i];
      }
    }
  }
}

// Sets [s0, s1), in groups of >= kGroup tokens: attention per set, then for the whole group
// x1 = x + att @ Wo + bo, LN2, Σ GELU(LN2(x1) @ W1 + b1) per set (row-tiled across set borders), and
// the set outputs mean(x1) + mean(g) @ W2 + b2 (one matmul over the group's sets).
void run_sets(const Weights& w, int64_t s0, int64_t s1, float* out) {
  constexpr int kGroup = 192;
  const int d = w.d, stride = 4 * d, fp = w.fp;
  std::vector<float> att, x1, h, qt, gsum, local;
  std::vector<v16> ev;
  std::vector<float*> rowsum;
  for (int64_t g0 = s0; g0 < s1;) {
    int64_t g1 = g0;
    int tokens = 0;
    while (g1 < s1 && (tokens < kGroup || g1 == g0)) tokens += std::max(0, w.counts[g1++]);
    att.resize(static_cast<size_t>(tokens) * d);
    x1.resize(static_cast<size_t>(tokens) * d);
    h.resize(static_cast<size_t>(tokens) * d);
    gsum.assign(static_cast<size_t>(g1 - g0) * fp, 0.0f);
    rowsum.resize(tokens);
    int t = 0;
    for (int64_t s = g0; s < g1; ++s) {
      const int n = w.counts[s];
      if (n <= 0) continue;
      const int32_t* ids = w.idx + w.starts[s];
      local.resize(static_cast<size_t>(n) * stride);
      for (int i = 0; i < n; ++i) {                // contiguous copy of the set's rows; x1 starts as x
        const float* src = w.rows + static_cast<int64_t>(ids[i]) * stride;
        std::memcpy(local.data() + static_cast<size_t>(i) * stride, src, sizeof(float) * stride);
        std::memcpy(x1.data() + static_cast<size_t>(t + i) * d, src, sizeof(float) * d);
      }
      attend(w, local.data(), n, att.data() + static_cast<size_t>(t) * d, qt, ev);
      for (int i = 0; i < n; ++i) rowsum[t + i] = gsum.data() + (s - g0) * fp;
      t += n;
    }
    matmul<false>(att.data(), d, w.wo, d, w.bo, x1.data(), d, tokens, d, d, nullptr);  // x1 += att Wo + bo
    t = 0;
    for (int64_t s = g0; s < g1; ++s) {          // set sum of x1, LN2
      const int n = w.counts[s];
      float* o = out + s * d;
      std::memset(o, 0, sizeof(float) * d);
      if (n <= 0) continue;
      for (int i = 0; i < n; ++i, ++t) {
        const float* r = x1.data() + static_cast<size_t>(t) * d;
        float mu = 0.0f;
        for (int e = 0; e < d; ++e) mu += r[e];
        mu /= d;
        float var = 0.0f;
        for (int e = 0; e < d; ++e) var += (r[e] - mu) * (r[e] - mu);
        const float rs = 1.0f / std::sqrt(var / d + w.eps);
        float* hh = h.data() + static_cast<size_t>(t) * d;
        for (int e = 0; e < d; ++e) {
          hh[e] = (r[e] - mu) * rs * w.ln_s[e] + w.ln_b[e];
          o[e] += r[e];
        }
      }
    }
    matmul<true>(h.data(), d, w.w1, fp, w.b1, nullptr, 0, tokens, d, fp, rowsum.data());
    for (int64_t s = g0; s < g1; ++s) {          // means of x1 (in out) and of g (in gsum)
      const int n = std::max(1, w.counts[s]);
      const float inv = 1.0f / n;
      float* o = out + s * d;
      float* gs = gsum.data() + (s - g0) * fp;
      for (int e = 0; e < d; ++e) o[e] *= inv;
      for (int e = 0; e < fp; ++e) gs[e] *= inv;
    }
    matmul<false>(gsum.data(), fp, w.w2, d, w.b2, out + g0 * d, d, static_cast<int>(g1 - g0), fp, d, nullptr);
    for (int64_t s = g0; s < g1; ++s)            // an empty set is 0, not b2
      if (w.counts[s] <= 0) std::memset(out + s * d, 0, sizeof(float) * d);
    g0 = g1;
  }
}

ffi::Error SetBlockMeansImpl(ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::S32> starts,
                             ffi::Buffer<ffi::S32> counts,
                             ffi::Buffer<ffi::F32> wo, ffi::Buffer<ffi::F32> bo, ffi::Buffer<ffi::F32> ln_s,
                             ffi::Buffer<ffi::F32> ln_b, ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> b1,
                             ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2, ffi::ResultBuffer<ffi::F32> out,
                             int64_t heads, float eps, int64_t threads) {
  const auto rd = rows.dimensions();
  const auto w1d = w1.dimensions();
  if (rd.size() != 2 || w1d.size() != 2) return ffi::Error::InvalidArgument("rows and w1 must be rank 2");
  const int d = static_cast<int>(rd[1] / 4);
  const int fp = static_cast<int>(w1d[1]);
  if (d % 16 || fp % 16 || heads <= 0 || d % heads || w1d[0] != d ||
      static_cast<int64_t>(w2.element_count()) != static_cast<int64_t>(fp) * d)
    return ffi::Error::InvalidArgument("set_block_means: need d % 16 == 0, Fp % 16 == 0, d % heads == 0, "
                                       "W1 [d, Fp], W2 [Fp, d]");
  const int64_t n_sets = static_cast<int64_t>(starts.element_count());
  if (static_cast<int64_t>(counts.element_count()) != n_sets)
    return ffi::Error::InvalidArgument("set_block_means: starts and counts differ in length");
  Weights w{rows.typed_data(), wo.typed_data(), bo.typed_data(), ln_s.typed_data(), ln_b.typed_data(),
            w1.typed_data(), b1.typed_data(), w2.typed_data(), b2.typed_data(), idx.typed_data(),
            starts.typed_data(), counts.typed_data(), d, static_cast<int>(heads), fp, eps};
  const int64_t n_rows = rd[0];
  const int64_t n_tok = static_cast<int64_t>(idx.element_count());
  std::vector<int64_t> cum(n_sets + 1, 0);  // tokens before set s, for the thread split
  for (int64_t s = 0; s < n_sets; ++s) {
    const int64_t a = w.starts[s], n = w.counts[s];
    if (a < 0 || n < 0 || a + n > n_tok)
      return ffi::Error::InvalidArgument("set_block_means: a set lies outside idx");
    for (int64_t t = a; t < a + n; ++t)
      if (w.idx[t] < 0 || w.idx[t] >= n_rows) return ffi::Error::InvalidArgument("set_block_means: idx out of range");
    cum[s + 1] = cum[s] + n;
  }
  float* o = out->typed_data();
  // split the sets into `threads` contiguous chunks of about equal token count
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n_sets)));
  std::vector<int64_t> cut(nt + 1, n_sets);
  cut[0] = 0;
  const int64_t total = cum[n_sets];
  for (int c = 1, s = 0; c < nt; ++c) {
    while (s < n_sets && cum[s] < total * c / nt) ++s;
    cut[c] = s;
  }
  std::vector<std::thread> pool;
  for (int c = 1; c < nt; ++c) pool.emplace_back(run_sets, std::cref(w), cut[c], cut[c + 1], o);
  run_sets(w, cut[0], cut[1], o);
  for (auto& t : pool) t.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SetBlockMeans, SetBlockMeansImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("threads"));
