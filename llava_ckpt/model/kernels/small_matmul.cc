// y = x @ w.T for the few rows of a decode step (x [M, K], w [N, K], float32, AVX2 + FMA).
//
// Why it exists: at decode time a linear layer's cost is reading its weight from memory once. MindSpore's
// CPU MatMul (oneDNN) did not share that read between rows: 4 rows cost 3-4x one row. Here every weight row
// is loaded once and multiplied with all rows of x (up to 8 at a time), so 4 rows cost little more than 1.
// Threads split the output columns; each output is summed in the same order whatever the thread count.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "small_matmul needs AVX2 and FMA (build with -mavx2 -mfma)"
#endif

namespace {

int g_threads = 1;
constexpr int kRowBlock = 8;  // rows of x per pass over the weight

float sum_lanes(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Output columns [n0, n1) for M rows of x, R weight rows at a time (independent loads in flight).
template <int M, int R>
void columns_by(const float *x, const float *w, float *y, int64_t n_out, int64_t k_in, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m256 acc[R][M];
    for (int r = 0; r < R; r++)
      for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= k_in; k += 8) {
      __m256 wv[R];
      for (int r = 0; r < R; r++) wv[r] = _mm256_loadu_ps(w + (n + r) * k_in + k);
      for (int m = 0; m < M; m++) {
        __m256 xv = _mm256_loadu_ps(x + m * k_in + k);
        for (int r = 0; r < R; r++) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
      }
    }
    for (int r = 0; r < R; r++) {
      for (int m = 0; m < M; m++) {
        float s = sum_lanes(acc[r][m]);
        for (int64_t t = k; t < k_in; t++) s += w[(n + r) * k_in + t] * x[m * k_in + t];
        y[m * n_out + n + r] = s;
      }
    }
  }
  if (R > 1 && n < n1) columns_by<M, 1>(x, w, y, n_out, k_in, n, n1);
}

// R weight rows at a time, the R * M accumulators (at most 12) plus R weight vectors held in the 16 vector
// registers; for 4 rows R = 3 measured ~10% faster than R = 2 at 7B widths.
template <int M>
void columns(const float *x, const float *w, float *y, int64_t n_out, int64_t k_in, int64_t n0, int64_t n1) {
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 3 : 1);
  columns_by<M, R>(x, w, y, n_out, k_in, n0, n1);
}

void part(const float *x, const float *w, float *y, int64_t m_rows, int64_t n_out, int64_t k_in, int64_t n0,
          int64_t n1) {
  for (int64_t m0 = 0; m0 < m_rows; m0 += kRowBlock) {
    const float *xb = x + m0 * k_in;
    float *yb = y + m0 * n_out;
    int64_t left = m_rows - m0;
    switch (left < kRowBlock ? left : kRowBlock) {
      case 1: columns<1>(xb, w, yb, n_out, k_in, n0, n1); break;
      case 2: columns<2>(xb, w, yb, n_out, k_in, n0, n1); break;
      case 3: columns<3>(xb, w, yb, n_out, k_in, n0, n1); break;
      case 4: columns<4>(xb, w, yb, n_out, k_in, n0, n1); break;
      case 5: columns<5>(xb, w, yb, n_out, k_in, n0, n1); break;
      case 6: columns<6>(xb, w, yb, n_out, k_in, n0, n1); break;
      case 7: columns<7>(xb, w, yb, n_out, k_in, n0, n1); break;
      default: columns<8>(xb, w, yb, n_out, k_in, n0, n1); break;
    }
  }
}

}  // namespace

extern "C" void small_matmul_set_threads(int n) { g_threads = n < 1 ? 1 : n; }

extern "C" void small_matmul(const float *x, const float *w, float *y, int64_t m_rows, int64_t n_out, int64_t k_in) {
  int64_t parts = g_threads;
  if (parts > n_out / 64) parts = n_out >= 64 ? n_out / 64 : 1;  // small outputs: not worth a thread
  int64_t chunk = (n_out + parts - 1) / parts;
  std::vector<std::thread> others;
  for (int64_t i = 1; i < parts; i++) {
    int64_t n0 = i * chunk, n1 = n0 + chunk < n_out ? n0 + chunk : n_out;
    if (n0 < n1) others.emplace_back(part, x, w, y, m_rows, n_out, k_in, n0, n1);
  }
  part(x, w, y, m_rows, n_out, k_in, 0, chunk < n_out ? chunk : n_out);
  for (auto &t : others) t.join();
}

// MindSpore's AOT custom-op entry: inputs x [M, K] and w [N, K], float32; output y [M, N]. Non-zero: refused.
extern "C" int SmallMatmul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                           void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 1;
  if (std::strcmp(dtypes[0], "float32") != 0 || std::strcmp(dtypes[1], "float32") != 0) return 2;
  int64_t m_rows = shapes[0][0], k_in = shapes[0][1], n_out = shapes[1][0];
  if (shapes[1][1] != k_in || shapes[2][0] != m_rows || shapes[2][1] != n_out) return 3;
  small_matmul(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
               static_cast<float *>(params[2]), m_rows, n_out, k_in);
  return 0;
}
