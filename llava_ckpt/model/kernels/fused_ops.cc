// A float32 model's work around its matmuls, fused: RMSNorm, CLIP's LayerNorm and QuickGELU, the split of a
// projection into heads (with RoPE for the decoder's q and k), attention (scores, mask, softmax, values in one
// pass per block of queries; a prompt's, or a decode step's over the KV cache's slots read where they lie), and
// SiLU(gate) * up. Every value and every sum is float32, in the order of
// operations transformers' eager code uses; only the order of a sum's terms differs from MindSpore's ops.
//
// Why it exists: at the 7B's prompt length (594 positions) MindSpore 2.10.0's CPU ops spent ~0.47 s a decoder
// layer on this work (the rotate-half concats, the [heads, S, S] scores cast and masked as separate tensors, the
// strided gate/up slices), 3/4 of the layer's bfloat16 matmuls' time. Fused it was ~75 ms with every op threaded
// (attention 39 of it), and a CLIP layer's ~0.15 s of it
// (LayerNorm 24-35 ms each, the bias adds 13 ms each) ~40 ms (measured on an AVX-512 EPYC, 2 cores).
//
// Attention skips, per block of 8 queries, the keys every row of the block has masked (bias <= MASKED / 2)
// when each row sees some key: exp() of such a score is exactly 0 in float32, so the result is the same as
// computing them (a decode step's cache slots not filled yet, a left-padded row's padding). A row that sees no
// key is computed over every key (uniform, as softmax of equal scores is).
//
// Built with AVX-512 F where the CPU has it, else AVX2 (the v_ helpers below: one body of code for both). On an
// AVX2-only EPYC (2 cores) a 7B-width decode step's layer spent 11.7 ms outside its matmuls (15.3 ms) in
// MindSpore's ops; its norms went from ~1 ms each to 0.3 ms with this build (measured).
#include <immintrin.h>

#include "threads.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "fused_ops needs AVX2 and FMA (build with -mavx2 -mfma; -mavx512f where the CPU has it)"
#endif

namespace {

// 16 floats at a time: one AVX-512 register where the build has AVX-512 F, else two AVX2 halves (lanes 0-7,
// 8-15) with the same operations, so one body of code serves both. Masks are 16 bits, lane i = bit i. The
// AVX2 sums and maxima of 16 lanes pair them in AVX-512's order (halves, then quarters, ...) and its 2^n
// scaling rounds once, as scalef does, so the two builds are meant to give the same numbers; the tests hold
// each to float64 formulas (tests/model/test_fused_ops.py), on whichever build the CPU gets.
#if defined(__AVX512F__)
using F16 = __m512;
using Mask = __mmask16;
inline F16 v_set1_ps(float a) { return _mm512_set1_ps(a); }
inline F16 v_setzero_ps() { return _mm512_setzero_ps(); }
inline F16 v_loadu_ps(const float *p) { return _mm512_loadu_ps(p); }
inline void v_storeu_ps(float *p, F16 a) { _mm512_storeu_ps(p, a); }
inline F16 v_maskz_loadu_ps(Mask m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }
inline void v_mask_storeu_ps(float *p, Mask m, F16 a) { _mm512_mask_storeu_ps(p, m, a); }
inline F16 v_add_ps(F16 a, F16 b) { return _mm512_add_ps(a, b); }
inline F16 v_sub_ps(F16 a, F16 b) { return _mm512_sub_ps(a, b); }
inline F16 v_mul_ps(F16 a, F16 b) { return _mm512_mul_ps(a, b); }
inline F16 v_div_ps(F16 a, F16 b) { return _mm512_div_ps(a, b); }
inline F16 v_min_ps(F16 a, F16 b) { return _mm512_min_ps(a, b); }
inline F16 v_max_ps(F16 a, F16 b) { return _mm512_max_ps(a, b); }
inline F16 v_fmadd_ps(F16 a, F16 b, F16 c) { return _mm512_fmadd_ps(a, b, c); }
inline F16 v_fnmadd_ps(F16 a, F16 b, F16 c) { return _mm512_fnmadd_ps(a, b, c); }
inline F16 v_maskz_mov_ps(Mask m, F16 a) { return _mm512_maskz_mov_ps(m, a); }
inline F16 v_maskz_sub_ps(Mask m, F16 a, F16 b) { return _mm512_maskz_sub_ps(m, a, b); }
inline F16 v_mask_max_ps(F16 src, Mask m, F16 a, F16 b) { return _mm512_mask_max_ps(src, m, a, b); }
inline F16 v_round_nearest_ps(F16 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline F16 v_scalef_ps(F16 a, F16 n) { return _mm512_scalef_ps(a, n); }
inline float v_reduce_add_ps(F16 a) { return _mm512_reduce_add_ps(a); }
inline float v_reduce_max_ps(F16 a) { return _mm512_reduce_max_ps(a); }
// 32 interleaved floats (g0, u0, g1, u1, ...) in lo, hi -> the 16 gs and the 16 us.
inline void deinterleave(F16 lo, F16 hi, F16 &g, F16 &u) {
  __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  g = _mm512_permutex2var_ps(lo, even, hi);
  u = _mm512_permutex2var_ps(lo, odd, hi);
}
#else
struct F16 {
  __m256 lo, hi;
};
using Mask = uint16_t;
inline __m256i lanes(Mask m, int half) {  // the 8 lanes' bits of one half as AVX2 lane masks
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  __m256i v = _mm256_set1_epi32(half ? (m >> 8) & 0xff : m & 0xff);
  return _mm256_cmpeq_epi32(_mm256_and_si256(v, bit), bit);
}
template <class Op>
inline F16 each(F16 a, F16 b, Op op) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
inline F16 v_set1_ps(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline F16 v_setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 v_loadu_ps(const float *p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void v_storeu_ps(float *p, F16 a) { _mm256_storeu_ps(p, a.lo), _mm256_storeu_ps(p + 8, a.hi); }
inline F16 v_maskz_loadu_ps(Mask m, const float *p) {  // masked-off lanes are not read (no fault)
  return {_mm256_maskload_ps(p, lanes(m, 0)), _mm256_maskload_ps(p + 8, lanes(m, 1))};
}
inline void v_mask_storeu_ps(float *p, Mask m, F16 a) {
  _mm256_maskstore_ps(p, lanes(m, 0), a.lo), _mm256_maskstore_ps(p + 8, lanes(m, 1), a.hi);
}
inline F16 v_add_ps(F16 a, F16 b) { return each(a, b, [](__m256 x, __m256 y) { return _mm256_add_ps(x, y); }); }
inline F16 v_sub_ps(F16 a, F16 b) { return each(a, b, [](__m256 x, __m256 y) { return _mm256_sub_ps(x, y); }); }
inline F16 v_mul_ps(F16 a, F16 b) { return each(a, b, [](__m256 x, __m256 y) { return _mm256_mul_ps(x, y); }); }
inline F16 v_div_ps(F16 a, F16 b) { return each(a, b, [](__m256 x, __m256 y) { return _mm256_div_ps(x, y); }); }
inline F16 v_min_ps(F16 a, F16 b) { return each(a, b, [](__m256 x, __m256 y) { return _mm256_min_ps(x, y); }); }
inline F16 v_max_ps(F16 a, F16 b) { return each(a, b, [](__m256 x, __m256 y) { return _mm256_max_ps(x, y); }); }
inline F16 v_fmadd_ps(F16 a, F16 b, F16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline F16 v_fnmadd_ps(F16 a, F16 b, F16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline F16 v_maskz_mov_ps(Mask m, F16 a) {
  return {_mm256_and_ps(a.lo, _mm256_castsi256_ps(lanes(m, 0))), _mm256_and_ps(a.hi, _mm256_castsi256_ps(lanes(m, 1)))};
}
inline F16 v_maskz_sub_ps(Mask m, F16 a, F16 b) { return v_maskz_mov_ps(m, v_sub_ps(a, b)); }
inline F16 v_mask_max_ps(F16 src, Mask m, F16 a, F16 b) {
  F16 x = v_max_ps(a, b);
  return {_mm256_blendv_ps(src.lo, x.lo, _mm256_castsi256_ps(lanes(m, 0))),
          _mm256_blendv_ps(src.hi, x.hi, _mm256_castsi256_ps(lanes(m, 1)))};
}
inline F16 v_round_nearest_ps(F16 a) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, kNearest), _mm256_round_ps(a.hi, kNearest)};
}
// a * 2^n for whole n in [-150, 128] (exp's range): two exact powers of two, so one rounding, as scalef's.
inline __m256 scale_half(__m256 a, __m256 n) {
  __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  auto pow2 = [](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(a, pow2(n1)), pow2(n2));
}
inline F16 v_scalef_ps(F16 a, F16 n) { return {scale_half(a.lo, n.lo), scale_half(a.hi, n.hi)}; }
inline float reduce_add_half(__m256 s) {  // AVX-512's order: quarters, then pairs, then the last two
  __m128 q = _mm_add_ps(_mm256_extractf128_ps(s, 1), _mm256_castps256_ps128(s));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(q) + _mm_cvtss_f32(_mm_shuffle_ps(q, q, 1));
}
inline float v_reduce_add_ps(F16 a) { return reduce_add_half(_mm256_add_ps(a.hi, a.lo)); }
inline float v_reduce_max_ps(F16 a) {
  __m256 s = _mm256_max_ps(a.hi, a.lo);
  __m128 q = _mm_max_ps(_mm256_extractf128_ps(s, 1), _mm256_castps256_ps128(s));
  q = _mm_max_ps(q, _mm_movehl_ps(q, q));
  return std::max(_mm_cvtss_f32(q), _mm_cvtss_f32(_mm_shuffle_ps(q, q, 1)));
}
inline void deinterleave(F16 lo, F16 hi, F16 &g, F16 &u) {  // see the AVX-512 version
  const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // per 8 floats: evens then odds
  __m256 a = _mm256_permutevar8x32_ps(lo.lo, pick), b = _mm256_permutevar8x32_ps(lo.hi, pick);
  __m256 c = _mm256_permutevar8x32_ps(hi.lo, pick), d = _mm256_permutevar8x32_ps(hi.hi, pick);
  g = {_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(c, d, 0x20)};
  u = {_mm256_permute2f128_ps(a, b, 0x31), _mm256_permute2f128_ps(c, d, 0x31)};
}
#endif

int g_threads = 1;
constexpr float kMasked = -3.4028234663852886e38f;  // float32's lowest: what attention adds where masked
constexpr int kQueries = 8;                           // queries per attention block
constexpr int64_t kKeys = 48;                         // the most keys per step of the scores (p's padding)

// f(item) for item in [0, n) over the threads (threads.h), one item at a time (items may differ in cost, as
// attention's do), when the call touches at least kThreadFloats floats (`floats`, about): below that, starting
// a thread costs about what the work does (a decode step's norms and heads), and it runs on the calling thread.
constexpr int64_t kThreadFloats = 1 << 15;
template <class F>
void for_items(int64_t n, int64_t floats, F f) {
  on_threads(n, 1, floats < kThreadFloats ? 1 : g_threads, [&](auto take) {
    for (int64_t i, stop; take(i, stop);) f(i);
  });
}

inline Mask tail(int64_t left) {
  return left >= 16 ? static_cast<Mask>(0xffff) : static_cast<Mask>((1u << left) - 1);
}

// exp(x) for 16 floats: 2^n * p(r), r = x - n ln2 (Cephes' expf polynomial, ~1 ulp); 0 below -104.
inline F16 exp16(F16 x) {
  x = v_min_ps(v_max_ps(x, v_set1_ps(-104.0f)), v_set1_ps(88.72f));
  F16 n = v_round_nearest_ps(v_mul_ps(x, v_set1_ps(1.44269504088896341f)));
  F16 r = v_fnmadd_ps(n, v_set1_ps(0.693359375f), x);
  r = v_fnmadd_ps(n, v_set1_ps(-2.12194440e-4f), r);
  F16 p = v_set1_ps(1.9875691500e-4f);
  p = v_fmadd_ps(p, r, v_set1_ps(1.3981999507e-3f));
  p = v_fmadd_ps(p, r, v_set1_ps(8.3334519073e-3f));
  p = v_fmadd_ps(p, r, v_set1_ps(4.1665795894e-2f));
  p = v_fmadd_ps(p, r, v_set1_ps(1.6666665459e-1f));
  p = v_fmadd_ps(p, r, v_set1_ps(5.0000001201e-1f));
  p = v_fmadd_ps(v_mul_ps(p, r), r, v_add_ps(r, v_set1_ps(1.0f)));
  return v_scalef_ps(p, n);
}

// ---- RMSNorm: y = w * (x * rsqrt(mean(x^2) + eps)), per row of `width`.
void rms_norm(const float *x, const float *w, float eps, float *y, int64_t rows, int64_t width) {
  for_items(rows, rows * width, [&](int64_t r) {
    const float *xr = x + r * width;
    float *yr = y + r * width;
    F16 acc = v_setzero_ps();
    for (int64_t i = 0; i < width; i += 16) {
      F16 v = v_maskz_loadu_ps(tail(width - i), xr + i);
      acc = v_fmadd_ps(v, v, acc);
    }
    float inv = 1.0f / std::sqrt(v_reduce_add_ps(acc) / static_cast<float>(width) + eps);
    F16 s = v_set1_ps(inv);
    for (int64_t i = 0; i < width; i += 16) {
      Mask m = tail(width - i);
      F16 h = v_mul_ps(v_maskz_loadu_ps(m, xr + i), s);
      v_mask_storeu_ps(yr + i, m, v_mul_ps(v_maskz_loadu_ps(m, w + i), h));
    }
  });
}

// ---- LayerNorm: d = x - mean(x); y = d * rsqrt(mean(d^2) + eps) * gamma + beta, per row of `width`.
void layer_norm(const float *x, const float *gamma, const float *beta, float eps, float *y, int64_t rows,
                int64_t width) {
  for_items(rows, rows * width, [&](int64_t r) {
    const float *xr = x + r * width;
    float *yr = y + r * width;
    F16 acc = v_setzero_ps();
    for (int64_t i = 0; i < width; i += 16) acc = v_add_ps(acc, v_maskz_loadu_ps(tail(width - i), xr + i));
    F16 mean = v_set1_ps(v_reduce_add_ps(acc) / static_cast<float>(width));
    acc = v_setzero_ps();
    for (int64_t i = 0; i < width; i += 16) {
      Mask m = tail(width - i);
      F16 dv = v_maskz_sub_ps(m, v_maskz_loadu_ps(m, xr + i), mean);
      acc = v_fmadd_ps(dv, dv, acc);
    }
    F16 s = v_set1_ps(1.0f / std::sqrt(v_reduce_add_ps(acc) / static_cast<float>(width) + eps));
    for (int64_t i = 0; i < width; i += 16) {
      Mask m = tail(width - i);
      F16 h = v_mul_ps(v_sub_ps(v_maskz_loadu_ps(m, xr + i), mean), s);
      h = v_add_ps(v_mul_ps(h, v_maskz_loadu_ps(m, gamma + i)), v_maskz_loadu_ps(m, beta + i));
      v_mask_storeu_ps(yr + i, m, h);
    }
  });
}

// ---- QuickGELU (CLIP's): y = x * sigmoid(1.702 x) = x / (1 + exp(-1.702 x)).
void quick_gelu(const float *x, float *y, int64_t n) {
  const int64_t chunk = 1 << 16;
  for_items((n + chunk - 1) / chunk, n, [&](int64_t c) {
    for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); i += 16) {
      Mask m = tail(n - i);
      F16 v = v_maskz_loadu_ps(m, x + i);
      F16 e = exp16(v_mul_ps(v, v_set1_ps(-1.702f)));
      v_mask_storeu_ps(y + i, m, v_div_ps(v, v_add_ps(v_set1_ps(1.0f), e)));
    }
  });
}

// ---- Heads: dst [B, heads, S, d] from columns[h] .. + d of each row of src [B * S, width]; with RoPE
// (cos, sin [Bc, S, d], Bc 1 or B) dst = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].
void heads(const float *src, int64_t width, const int64_t *columns, int64_t n_heads, const float *cos,
           const float *sin, int64_t cos_batch, float *dst, int64_t batch, int64_t seq, int64_t d) {
  int64_t half = d / 2;
  for_items(batch * n_heads, batch * n_heads * seq * d, [&](int64_t item) {
    int64_t b = item / n_heads, h = item % n_heads;
    for (int64_t s = 0; s < seq; s++) {
      const float *x = src + (b * seq + s) * width + columns[h];
      float *out = dst + ((b * n_heads + h) * seq + s) * d;
      if (cos == nullptr) {
        std::memcpy(out, x, static_cast<size_t>(d) * 4);
        continue;
      }
      const float *c = cos + ((cos_batch > 1 ? b : 0) * seq + s) * d;
      const float *n = sin + ((cos_batch > 1 ? b : 0) * seq + s) * d;
      for (int64_t i = 0; i < half; i += 16) {  // [x1, x2] -> [x1 c1 - x2 s1, x2 c2 + x1 s2]
        Mask m = tail(half - i);
        F16 x1 = v_maskz_loadu_ps(m, x + i), x2 = v_maskz_loadu_ps(m, x + half + i);
        F16 lo = v_sub_ps(v_mul_ps(x1, v_maskz_loadu_ps(m, c + i)), v_mul_ps(x2, v_maskz_loadu_ps(m, n + i)));
        F16 hi = v_add_ps(v_mul_ps(x2, v_maskz_loadu_ps(m, c + half + i)),
                          v_mul_ps(x1, v_maskz_loadu_ps(m, n + half + i)));
        v_mask_storeu_ps(out + i, m, lo);
        v_mask_storeu_ps(out + half + i, m, hi);
      }
    }
  });
}

// ---- Attention: out [B, S, heads * d] = softmax(q k^T * scale + bias) v, per head; q [B, heads, S, d],
// k and v [B, kv, T, d] (head h uses kv head h / (heads / kv)), bias [Bb, S, T] (Bb 1 or B).
// Cached (a decode step): the keys are a cache's T slots, then the S new positions: k_cache [B, kv, d, Tc]
// (each slot a column), v_cache [B, kv, Tc, d], k and v [B, kv, S, d]; keys = Tc + S, bias [Bb, S, Tc + S].
struct Attn {
  const float *q, *k, *v, *bias;
  float scale;
  float *out;
  int64_t batch, n_heads, n_kv, seq, keys, d, bias_batch;
  const float *k_cache = nullptr, *v_cache = nullptr;  // cached: keys 0 .. cached-1 are the cache's slots
  int64_t cached = 0;
};

// Per (bias row-batch, query): [first, last) of the keys it sees; first = last = -1 when it sees none.
void seen_ranges(const Attn &a, std::vector<int64_t> &lo, std::vector<int64_t> &hi) {
  int64_t n = a.bias_batch * a.seq;
  lo.assign(n, -1);
  hi.assign(n, -1);
  for (int64_t r = 0; r < n; r++) {
    const float *row = a.bias + r * a.keys;
    for (int64_t j = 0; j < a.keys; j++) {
      if (row[j] > kMasked * 0.5f) {
        if (lo[r] < 0) lo[r] = j;
        hi[r] = j + 1;
      }
    }
  }
}

inline Mask tail_from(int64_t left) { return left <= 0 ? static_cast<Mask>(0) : tail(left); }

// Register blocking: AVX-512 has 32 registers of 16 floats, AVX2 16 of 8 (an F16 is two): sums held at once,
// in F16s, so that the sums, the loads and a broadcast stay in registers (more spilled, measured on AVX2).
#if defined(__AVX512F__)
constexpr int kSums = 24, kScoreRows = 8;
#else
constexpr int kSums = 4, kScoreRows = 4;
#endif
constexpr int kScoreVecs = kSums / kScoreRows;  // 16-key vectors per step of the scores: 3, or 1

// p[m][j] = q row m . key j for keys [js, j1), `rows` rows of q (stride d); key j's i-th value is kt[i * tp + j]
// (a prompt's keys transposed, readable up to tp). Each sum runs over i in order, as cached_scores' do.
void scores(const float *q, int rows, int64_t d, const float *kt, int64_t tp, int64_t js, int64_t j1, float *p) {
  constexpr int R = kScoreRows, V = kScoreVecs;
  for (int m0 = 0; m0 < rows; m0 += R) {
    int mr = std::min(R, rows - m0);
    for (int64_t j = js; j < j1; j += 16 * V) {
      F16 acc[R][V];
      for (int m = 0; m < R; m++)
        for (int c = 0; c < V; c++) acc[m][c] = v_setzero_ps();
      for (int64_t i = 0; i < d; i++) {
        F16 kv[V];
        for (int c = 0; c < V; c++) kv[c] = v_loadu_ps(kt + i * tp + j + 16 * c);
        for (int m = 0; m < R; m++) {
          if (m >= mr) break;
          F16 qv = v_set1_ps(q[(m0 + m) * d + i]);
          for (int c = 0; c < V; c++) acc[m][c] = v_fmadd_ps(qv, kv[c], acc[m][c]);
        }
      }
      for (int m = 0; m < mr; m++)
        for (int c = 0; c < V; c++) v_storeu_ps(p + (m0 + m) * tp + j + 16 * c, acc[m][c]);
    }
  }
}

// scores' sums for a cache's slots [js, j1) (k_cache [d][stride], each slot a column), streaming the cache row
// by row (one pass over its memory in address order) and summing into p (L1-resident) as it goes.
void cached_scores(const float *q, int rows, int64_t d, const float *kc, int64_t stride, int64_t js, int64_t j1,
                   float *p, int64_t tp) {
  for (int m = 0; m < rows; m++) std::fill(p + m * tp + js, p + m * tp + j1, 0.0f);
  int64_t full = js + (j1 - js) / 16 * 16;
  Mask last = tail_from(j1 - full);
  for (int64_t i = 0; i < d; i++) {
    const float *kr = kc + i * stride;
    for (int m = 0; m < rows; m++) {
      F16 qv = v_set1_ps(q[m * d + i]);
      float *pr = p + m * tp;
      for (int64_t j = js; j < full; j += 16)
        v_storeu_ps(pr + j, v_fmadd_ps(qv, v_loadu_ps(kr + j), v_loadu_ps(pr + j)));
      if (last) v_mask_storeu_ps(pr + full, last, v_fmadd_ps(qv, v_maskz_loadu_ps(last, kr + full),
                                                            v_maskz_loadu_ps(last, pr + full)));
    }
  }
}

// softmax over [j0, j1) of (p * scale + bias), in place, for `rows` rows (p stride tp, bias stride `keys`).
void softmax_rows(float *p, int64_t tp, const float *bias, int64_t keys, int rows, int64_t j0, int64_t j1,
                  float scale_value) {
  F16 scale = v_set1_ps(scale_value);
  for (int m = 0; m < rows; m++) {
    float *pr = p + m * tp;
    const float *br = bias + m * keys;
    F16 mx = v_set1_ps(-INFINITY);
    for (int64_t j = j0; j < j1; j += 16) {
      Mask mk = tail(j1 - j);
      F16 s = v_add_ps(v_mul_ps(v_maskz_loadu_ps(mk, pr + j), scale), v_maskz_loadu_ps(mk, br + j));
      v_mask_storeu_ps(pr + j, mk, s);
      mx = v_mask_max_ps(mx, mk, mx, s);
    }
    F16 top = v_set1_ps(v_reduce_max_ps(mx));
    F16 sum = v_setzero_ps();
    for (int64_t j = j0; j < j1; j += 16) {
      Mask mk = tail(j1 - j);
      F16 e = v_maskz_mov_ps(mk, exp16(v_sub_ps(v_maskz_loadu_ps(mk, pr + j), top)));
      v_mask_storeu_ps(pr + j, mk, e);
      sum = v_add_ps(sum, e);
    }
    F16 inv = v_set1_ps(1.0f / v_reduce_add_ps(sum));
    for (int64_t j = j0; j < j1; j += 16) {
      Mask mk = tail(j1 - j);
      v_mask_storeu_ps(pr + j, mk, v_mul_ps(v_maskz_loadu_ps(mk, pr + j), inv));
    }
  }
}

// out rows i0 .. i0+rows of head h = probabilities [rows][tp] (keys j0 .. j1) . v rows (vrow(j): key j's d
// values): R rows x V vectors of d per pass (kSums sums), each v row loaded once per pass.
template <int V, class VRow>
void pv_pass(const Attn &a, const float *p, int64_t tp, VRow vrow, int64_t b, int64_t h, int64_t i0, int rows,
             int64_t j0, int64_t j1, int64_t c0) {
  constexpr int R = kSums / V;
  int64_t d = a.d;
  Mask mk[V];
  for (int c = 0; c < V; c++) mk[c] = c0 + 16 * c < d ? tail(d - c0 - 16 * c) : 0;
  for (int m0 = 0; m0 < rows; m0 += R) {
    int mr = std::min(R, rows - m0);
    F16 acc[R][V];
    for (int m = 0; m < R; m++)
      for (int c = 0; c < V; c++) acc[m][c] = v_setzero_ps();
    for (int64_t j = j0; j < j1; j++) {
      const float *vj = vrow(j) + c0;
      F16 vv[V];
      for (int c = 0; c < V; c++) vv[c] = v_maskz_loadu_ps(mk[c], vj + 16 * c);
      for (int m = 0; m < R; m++) {
        if (m >= mr) break;
        F16 pv = v_set1_ps(p[(m0 + m) * tp + j]);
        for (int c = 0; c < V; c++) acc[m][c] = v_fmadd_ps(pv, vv[c], acc[m][c]);
      }
    }
    for (int m = 0; m < mr; m++) {
      float *o = a.out + ((b * a.seq + i0 + m0 + m) * a.n_heads + h) * d + c0;
      for (int c = 0; c < V; c++) v_mask_storeu_ps(o + 16 * c, mk[c], acc[m][c]);
    }
  }
}

template <class VRow>
void pv(const Attn &a, const float *p, int64_t tp, VRow vrow, int64_t b, int64_t h, int64_t i0, int rows,
        int64_t j0, int64_t j1) {
#if defined(__AVX512F__)
  int64_t vecs = (a.d + 15) / 16;
  if (vecs == 8) return pv_pass<8>(a, p, tp, vrow, b, h, i0, rows, j0, j1, 0);  // d = 128 (LLaMA)
  if (vecs == 4) return pv_pass<4>(a, p, tp, vrow, b, h, i0, rows, j0, j1, 0);  // d = 64 (CLIP)
  for (int64_t c0 = 0; c0 < a.d; c0 += 64) pv_pass<4>(a, p, tp, vrow, b, h, i0, rows, j0, j1, c0);
#else
  for (int64_t c0 = 0; c0 < a.d; c0 += 32) pv_pass<2>(a, p, tp, vrow, b, h, i0, rows, j0, j1, c0);
#endif
}

// One KV head's queries (its heads' rows, blocks of kQueries) over its keys.
void attend_group(const Attn &a, int64_t b, int64_t g, const std::vector<int64_t> &lo,
                  const std::vector<int64_t> &hi) {
  int64_t d = a.d, t = a.keys, tp = (t + kKeys - 1) / kKeys * kKeys + kKeys, rep = a.n_heads / a.n_kv;
  int64_t tc = a.cached, fresh = t - tc;  // cache slots, then the keys of k / v
  const float *k = a.k + (b * a.n_kv + g) * fresh * d;
  const float *v = a.v + (b * a.n_kv + g) * fresh * d;
  const float *kc = tc ? a.k_cache + (b * a.n_kv + g) * d * tc : nullptr;
  const float *vc = tc ? a.v_cache + (b * a.n_kv + g) * tc * d : nullptr;
  std::vector<float> kt;  // k / v's keys transposed: [d][keys], padded (a prompt's; a step's few are dotted)
  if (!tc) {
    kt.assign(static_cast<size_t>(d * tp), 0.0f);
    for (int64_t j0 = 0; j0 < t; j0 += 16)  // 16 keys at a time: each kt row written 16 floats at once
      for (int64_t i = 0; i < d; i++)
        for (int64_t j = j0; j < std::min(t, j0 + 16); j++) kt[i * tp + j] = k[j * d + i];
  }
  auto vrow = [&](int64_t j) { return j < tc ? vc + j * d : v + (j - tc) * d; };
  std::vector<float> p(static_cast<size_t>(kQueries * tp));
  const int64_t bb = a.bias_batch > 1 ? b : 0;
  for (int64_t r = 0; r < rep; r++) {
    int64_t h = g * rep + r;
    const float *qh = a.q + (b * a.n_heads + h) * a.seq * d;
    for (int64_t i0 = 0; i0 < a.seq; i0 += kQueries) {
      int rows = static_cast<int>(std::min<int64_t>(kQueries, a.seq - i0));
      int64_t j0 = t, j1 = 0;  // keys any row of the block sees
      bool blind = false;
      for (int m = 0; m < rows; m++) {
        int64_t row = bb * a.seq + i0 + m;
        if (lo[row] < 0) blind = true;
        else j0 = std::min(j0, lo[row]), j1 = std::max(j1, hi[row]);
      }
      if (blind) j0 = 0, j1 = t;
      int64_t js = j0 / 16 * 16;  // scores in whole steps of kKeys from a 16-aligned key (p is padded for it)
      const float *q = qh + i0 * d;
      if (!tc) {
        scores(q, rows, d, kt.data(), tp, js, j1, p.data());
      } else {
        if (js < tc) cached_scores(q, rows, d, kc, tc, js, std::min(j1, tc), p.data(), tp);
        for (int64_t j = std::max(j0, tc); j < j1; j++)  // the new positions' keys, one dot each
          for (int m = 0; m < rows; m++) {
            F16 acc = v_setzero_ps();
            for (int64_t i = 0; i < d; i += 16) {
              Mask mk = tail(d - i);
              acc = v_fmadd_ps(v_maskz_loadu_ps(mk, q + m * d + i), v_maskz_loadu_ps(mk, k + (j - tc) * d + i), acc);
            }
            p[m * tp + j] = v_reduce_add_ps(acc);
          }
      }
      softmax_rows(p.data(), tp, a.bias + (bb * a.seq + i0) * t, t, rows, j0, j1, a.scale);
      pv(a, p.data(), tp, vrow, b, h, i0, rows, j0, j1);
    }
  }
}

void attention(const Attn &a) {
  std::vector<int64_t> lo, hi;
  seen_ranges(a, lo, hi);
  int64_t floats = a.batch * (a.n_kv * 2 * a.d + a.n_heads * a.seq) * a.keys;  // k and v, the scores
  for_items(a.batch * a.n_kv, floats, [&](int64_t item) { attend_group(a, item / a.n_kv, item % a.n_kv, lo, hi); });
}

// ---- SiLU(gate) * up = gate / (1 + exp(-gate)) * up; pairs: one [rows, F, 2] input of (gate, up) pairs.
void silu_mul(const float *gate, const float *up, bool pairs, float *y, int64_t rows, int64_t width) {
  for_items(rows, rows * width * 3, [&](int64_t r) {
    float *yr = y + r * width;
    for (int64_t i = 0; i < width; i += 16) {
      Mask m = tail(width - i);
      F16 g, u;
      if (pairs) {  // 2n floats (gate, up, gate, up, ...) -> n gates, n ups
        const float *src = gate + (r * width + i) * 2;
        int64_t n2 = 2 * std::min<int64_t>(16, width - i);
        F16 lo = v_maskz_loadu_ps(tail(n2), src);
        F16 hi = n2 > 16 ? v_maskz_loadu_ps(tail(n2 - 16), src + 16) : v_setzero_ps();
        deinterleave(lo, hi, g, u);
      } else {
        g = v_maskz_loadu_ps(m, gate + r * width + i);
        u = v_maskz_loadu_ps(m, up + r * width + i);
      }
      F16 e = exp16(v_sub_ps(v_setzero_ps(), g));
      F16 s = v_div_ps(g, v_add_ps(v_set1_ps(1.0f), e));
      v_mask_storeu_ps(yr + i, m, v_mul_ps(s, u));
    }
  });
}

bool is_f32(const char *dtype) { return std::strcmp(dtype, "float32") == 0; }

}  // namespace

extern "C" void fused_ops_set_threads(int n) { g_threads = n < 1 ? 1 : n; }

// MindSpore AOT entries: params are the inputs then the outputs. Non-zero: refused (1 ranks, 2 dtypes, 3 shapes).

// x [R, H], w [H], eps [1] -> y [R, H]
extern "C" int RmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                       void *) {
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 1 || ndims[3] != 2) return 1;
  for (int i = 0; i < 4; i++)
    if (!is_f32(dtypes[i])) return 2;
  int64_t rows = shapes[0][0], width = shapes[0][1];
  if (shapes[1][0] != width || shapes[3][0] != rows || shapes[3][1] != width) return 3;
  rms_norm(static_cast<float *>(params[0]), static_cast<float *>(params[1]), *static_cast<float *>(params[2]),
           static_cast<float *>(params[3]), rows, width);
  return 0;
}

// x [R, H], gamma, beta [H], eps [1] -> y [R, H]
extern "C" int LayerNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                         void *) {
  if (nparam != 5 || ndims[0] != 2 || ndims[1] != 1 || ndims[2] != 1 || ndims[4] != 2) return 1;
  for (int i = 0; i < 5; i++)
    if (!is_f32(dtypes[i])) return 2;
  int64_t rows = shapes[0][0], width = shapes[0][1];
  if (shapes[1][0] != width || shapes[2][0] != width || shapes[4][0] != rows || shapes[4][1] != width) return 3;
  layer_norm(static_cast<float *>(params[0]), static_cast<float *>(params[1]), static_cast<float *>(params[2]),
             *static_cast<float *>(params[3]), static_cast<float *>(params[4]), rows, width);
  return 0;
}

// x [N] -> y [N]
extern "C" int QuickGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                         void *) {
  if (nparam != 2 || ndims[0] != 1 || ndims[1] != 1) return 1;
  if (!is_f32(dtypes[0]) || !is_f32(dtypes[1])) return 2;
  if (shapes[1][0] != shapes[0][0]) return 3;
  quick_gelu(static_cast<float *>(params[0]), static_cast<float *>(params[1]), shapes[0][0]);
  return 0;
}

// q_src [B, S, Wq], k_src [B, S, Wk], v_src [B, S, Wv], columns [heads + 2 kv] int64 (each head's first column in
// its source: q heads, then k, then v), cos, sin [Bc, S, d] (Bc 1 or B) -> q [B, heads, S, d], k and v
// [B, kv, S, d], RoPE on q and k. The SplitHeads entry takes no cos / sin.
int split_heads(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool rope) {
  int n_in = rope ? 6 : 4;
  if (nparam != n_in + 3) return 1;
  for (int i = 0; i < nparam; i++) {
    if (i == 3) {
      if (std::strcmp(dtypes[i], "int64") != 0 || ndims[i] != 1) return 2;
    } else if (!is_f32(dtypes[i])) {
      return 2;
    }
  }
  for (int i = 0; i < 3; i++)
    if (ndims[i] != 3 || ndims[n_in + i] != 4) return 1;
  int64_t batch = shapes[0][0], seq = shapes[0][1], n_heads = shapes[n_in][1], d = shapes[n_in][3];
  int64_t n_kv = shapes[n_in + 1][1];
  if (shapes[3][0] != n_heads + 2 * n_kv) return 3;
  const int64_t *columns = static_cast<const int64_t *>(params[3]);
  int64_t counts[3] = {n_heads, n_kv, n_kv}, offset[3] = {0, n_heads, n_heads + n_kv};
  for (int i = 0; i < 3; i++) {
    if (shapes[i][0] != batch || shapes[i][1] != seq) return 3;
    const int64_t *o = shapes[n_in + i];
    if (o[0] != batch || o[1] != counts[i] || o[2] != seq || o[3] != d) return 3;
    for (int64_t h = 0; h < counts[i]; h++) {
      int64_t c = columns[offset[i] + h];
      if (c < 0 || c + d > shapes[i][2]) return 3;
    }
  }
  const float *cos = nullptr, *sin = nullptr;
  int64_t cos_batch = 1;
  if (rope) {
    if (ndims[4] != 3 || ndims[5] != 3) return 1;
    cos_batch = shapes[4][0];
    for (int i = 4; i < 6; i++)
      if ((shapes[i][0] != 1 && shapes[i][0] != batch) || shapes[i][1] != seq || shapes[i][2] != d ||
          shapes[i][0] != cos_batch)
        return 3;
    if (d % 2) return 3;
    cos = static_cast<const float *>(params[4]);
    sin = static_cast<const float *>(params[5]);
  }
  for (int i = 0; i < 3; i++)
    heads(static_cast<const float *>(params[i]), shapes[i][2], columns + offset[i], counts[i], i < 2 ? cos : nullptr,
          i < 2 ? sin : nullptr, cos_batch, static_cast<float *>(params[n_in + i]), batch, seq, d);
  return 0;
}

extern "C" int SplitHeadsRope(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  return split_heads(nparam, params, ndims, shapes, dtypes, true);
}

extern "C" int SplitHeads(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  return split_heads(nparam, params, ndims, shapes, dtypes, false);
}

// The shapes both attention entries check once `a` is read from them: k and v [B, kv, fresh, d], kv heads
// dividing the heads, bias [1 or B, S, keys], out [B, S, heads * d].
static bool shapes_agree(const Attn &a, int64_t fresh, const int64_t *k, const int64_t *v, const int64_t *bias,
                         const int64_t *out) {
  for (const int64_t *kv : {k, v})
    if (kv[0] != a.batch || kv[1] != a.n_kv || kv[2] != fresh || kv[3] != a.d) return false;
  return a.n_kv >= 1 && a.n_heads % a.n_kv == 0 && (a.bias_batch == 1 || a.bias_batch == a.batch) &&
         bias[1] == a.seq && bias[2] == a.keys && out[0] == a.batch && out[1] == a.seq && out[2] == a.n_heads * a.d;
}

// q [B, heads, S, d], k and v [B, kv, T, d], bias [Bb, S, T] (Bb 1 or B), scale [1] -> out [B, S, heads * d]
extern "C" int Attention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                         void *) {
  if (nparam != 6 || ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4 || ndims[3] != 3 || ndims[4] != 1 ||
      ndims[5] != 3)
    return 1;
  for (int i = 0; i < 6; i++)
    if (!is_f32(dtypes[i])) return 2;
  Attn a{static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
         static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
         *static_cast<const float *>(params[4]), static_cast<float *>(params[5]),
         shapes[0][0], shapes[0][1], shapes[1][1], shapes[0][2], shapes[1][2], shapes[0][3], shapes[3][0]};
  if (!shapes_agree(a, a.keys, shapes[1], shapes[2], shapes[3], shapes[5])) return 3;
  attention(a);
  return 0;
}

// q [B, heads, S, d], k and v [B, kv, S, d], k_cache [B, kv, d, T], v_cache [B, kv, T, d], bias [Bb, S, T + S]
// (Bb 1 or B), scale [1] -> out [B, S, heads * d]: the S new positions over the cache's T slots and themselves.
extern "C" int AttentionCached(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                               void *) {
  if (nparam != 8) return 1;
  for (int i = 0; i < 8; i++)
    if (ndims[i] != (i == 5 || i == 7 ? 3 : i == 6 ? 1 : 4)) return 1;
  for (int i = 0; i < 8; i++)
    if (!is_f32(dtypes[i])) return 2;
  const int64_t *q = shapes[0], *kc = shapes[3], *vc = shapes[4];
  int64_t batch = q[0], n_kv = shapes[1][1], seq = q[2], d = q[3], tc = kc[3];
  Attn a{static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
         static_cast<const float *>(params[2]), static_cast<const float *>(params[5]),
         *static_cast<const float *>(params[6]), static_cast<float *>(params[7]),
         batch, q[1], n_kv, seq, tc + seq, d, shapes[5][0]};
  a.k_cache = static_cast<const float *>(params[3]);
  a.v_cache = static_cast<const float *>(params[4]);
  a.cached = tc;
  if (!shapes_agree(a, seq, shapes[1], shapes[2], shapes[5], shapes[7]) || kc[0] != batch || kc[1] != n_kv ||
      kc[2] != d || vc[0] != batch || vc[1] != n_kv || vc[2] != tc || vc[3] != d)
    return 3;
  attention(a);
  return 0;
}

// gate and up [R, F] -> y [R, F]; SiluMulPairs: pairs [R, 2F] of interleaved (gate, up) -> y [R, F]
extern "C" int SiluMul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 1;
  for (int i = 0; i < 3; i++)
    if (!is_f32(dtypes[i])) return 2;
  for (int i = 1; i < 3; i++)
    if (shapes[i][0] != shapes[0][0] || shapes[i][1] != shapes[0][1]) return 3;
  silu_mul(static_cast<float *>(params[0]), static_cast<float *>(params[1]), false, static_cast<float *>(params[2]),
           shapes[0][0], shapes[0][1]);
  return 0;
}

extern "C" int SiluMulPairs(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                            void *) {
  if (nparam != 2 || ndims[0] != 2 || ndims[1] != 2) return 1;
  for (int i = 0; i < 2; i++)
    if (!is_f32(dtypes[i])) return 2;
  if (shapes[1][0] != shapes[0][0] || shapes[0][1] != 2 * shapes[1][1]) return 3;
  silu_mul(static_cast<float *>(params[0]), nullptr, true, static_cast<float *>(params[1]), shapes[1][0],
           shapes[1][1]);
  return 0;
}
