// y = x @ w.T for the few rows of a decode step (x [M, K] float32, w [N, K] float32, float16 or bfloat16).
//
// Why it exists: at decode time a linear layer's cost is reading its weight from memory once. MindSpore's
// CPU MatMul (oneDNN) did not share that read between rows: 4 rows cost 3-4x one row. Here every weight row
// is loaded once and multiplied with all rows of x (up to 8 at a time), so 4 rows cost little more than 1.
// A 16-bit weight is widened to float32 in registers as it is read (F16C for float16, a shift for bfloat16):
// the model keeps the checkpoint's 16-bit weights and still computes in float32, reading half the bytes.
// Threads split the output columns; each output is summed in the same order whatever the thread count.
#include <immintrin.h>

#include "aot_matmul.h"
#include "threads.h"

#include <cstdint>
#include <cstring>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "small_matmul needs AVX2, FMA and F16C (build with -mavx2 -mfma -mf16c)"
#endif

namespace {

int g_threads = 1;
constexpr int kRowBlock = 8;  // rows of x per pass over the weight

struct Half { uint16_t bits; };      // IEEE float16
struct BFloat16 { uint16_t bits; };  // the top half of a float32

inline float to_float(float v) { return v; }
inline float to_float(Half v) { return _cvtsh_ss(v.bits); }
inline float to_float(BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#ifdef __AVX512F__
// 16 lanes, 32 vector registers (built with -mavx512f where /proc/cpuinfo lists it).
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec load(const float *p) { return _mm512_loadu_ps(p); }
inline Vec load(const Half *p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))); }
inline Vec load(const BFloat16 *p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum_lanes(Vec a) { return _mm512_reduce_add_ps(a); }
// R weight rows at a time: R * M accumulators plus R weight vectors within the 32 registers.
template <int M>
constexpr int rows_at_once() { return M <= 2 ? 8 : (M <= 4 ? 4 : 3); }
#else
// 8 lanes, 16 vector registers.
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec load(const float *p) { return _mm256_loadu_ps(p); }
inline Vec load(const Half *p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }
inline Vec load(const BFloat16 *p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float sum_lanes(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// R weight rows at a time: the R * M accumulators (at most 12) plus R weight vectors in the 16 registers;
// for 4 rows R = 3 measured ~10% faster than R = 2 at 7B widths.
template <int M>
constexpr int rows_at_once() { return M <= 2 ? 4 : (M <= 4 ? 3 : 1); }
#endif

// Output columns [n0, n1) for M rows of x, R weight rows at a time (independent loads in flight).
template <typename W, int M, int R>
void columns_by(const float *x, const W *w, float *y, int64_t n_out, int64_t k_in, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    Vec acc[R][M];
    for (int r = 0; r < R; r++)
      for (int m = 0; m < M; m++) acc[r][m] = zero();
    int64_t k = 0;
    for (; k + kLanes <= k_in; k += kLanes) {
      Vec wv[R];
      for (int r = 0; r < R; r++) wv[r] = load(w + (n + r) * k_in + k);
      for (int m = 0; m < M; m++) {
        Vec xv = load(x + m * k_in + k);
        for (int r = 0; r < R; r++) acc[r][m] = fmadd(wv[r], xv, acc[r][m]);
      }
    }
    for (int r = 0; r < R; r++) {
      for (int m = 0; m < M; m++) {
        float s = sum_lanes(acc[r][m]);
        for (int64_t t = k; t < k_in; t++) s += to_float(w[(n + r) * k_in + t]) * x[m * k_in + t];
        y[m * n_out + n + r] = s;
      }
    }
  }
  if (R > 1 && n < n1) columns_by<W, M, 1>(x, w, y, n_out, k_in, n, n1);
}

template <typename W, int M>
void columns(const float *x, const W *w, float *y, int64_t n_out, int64_t k_in, int64_t n0, int64_t n1) {
  columns_by<W, M, rows_at_once<M>()>(x, w, y, n_out, k_in, n0, n1);
}

template <typename W>
void part(const float *x, const W *w, float *y, int64_t m_rows, int64_t n_out, int64_t k_in, int64_t n0,
          int64_t n1) {
  for (int64_t m0 = 0; m0 < m_rows; m0 += kRowBlock) {
    const float *xb = x + m0 * k_in;
    float *yb = y + m0 * n_out;
    int64_t left = m_rows - m0;
    switch (left < kRowBlock ? left : kRowBlock) {
      case 1: columns<W, 1>(xb, w, yb, n_out, k_in, n0, n1); break;
      case 2: columns<W, 2>(xb, w, yb, n_out, k_in, n0, n1); break;
      case 3: columns<W, 3>(xb, w, yb, n_out, k_in, n0, n1); break;
      case 4: columns<W, 4>(xb, w, yb, n_out, k_in, n0, n1); break;
      case 5: columns<W, 5>(xb, w, yb, n_out, k_in, n0, n1); break;
      case 6: columns<W, 6>(xb, w, yb, n_out, k_in, n0, n1); break;
      case 7: columns<W, 7>(xb, w, yb, n_out, k_in, n0, n1); break;
      default: columns<W, 8>(xb, w, yb, n_out, k_in, n0, n1); break;
    }
  }
}

template <typename W>
void threaded(const float *x, const W *w, float *y, int64_t m_rows, int64_t n_out, int64_t k_in) {
  // ranges of 256 columns (16 for the 7B's 4096): small outputs stay on the calling thread
  on_threads(n_out, 256, g_threads, [&](auto take) {
    for (int64_t n0, n1; take(n0, n1);) part<W>(x, w, y, m_rows, n_out, k_in, n0, n1);
  });
}

}  // namespace

extern "C" void small_matmul_set_threads(int n) { g_threads = n < 1 ? 1 : n; }

// weight_type: 0 float32, 1 float16, 2 bfloat16.
extern "C" int small_matmul(const float *x, const void *w, float *y, int64_t m_rows, int64_t n_out, int64_t k_in,
                            int weight_type) {
  switch (weight_type) {
    case 0: threaded(x, static_cast<const float *>(w), y, m_rows, n_out, k_in); return 0;
    case 1: threaded(x, static_cast<const Half *>(w), y, m_rows, n_out, k_in); return 0;
    case 2: threaded(x, static_cast<const BFloat16 *>(w), y, m_rows, n_out, k_in); return 0;
    default: return 4;
  }
}

// MindSpore's AOT custom-op entry (aot_matmul.h).
AOT_MATMUL_ENTRY(SmallMatmul, small_matmul)
