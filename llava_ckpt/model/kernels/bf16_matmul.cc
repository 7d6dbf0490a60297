// y = x @ w.T for a prefill's many rows in bfloat16, products summed in float32 (AVX-512 BF16: vdpbf16ps).
// x [M, K] float32, w [N, K] float32, float16 or bfloat16; y [M, N] float32.
//
// Why it exists: MindSpore 2.10's CPU MatMul has no bfloat16 kernel, and its float16 one runs at float32's
// speed, while one vdpbf16ps does 32 multiply-adds (twice a float32 FMA's). x and w are rounded to bfloat16
// (to nearest even) as they are packed, w straight from the checkpoint's 16-bit matrix (no widened copy);
// every sum is float32. Numerics are bfloat16 matmul's, which is why this is a mode of its own (verify and
// generate name it), never a silent replacement for float32.
//
// Blocking: x is packed once per call as bfloat16 rows (by all threads); w is packed per block of 48 output
// columns x 2048 of K into pairs along K ([pair][column], the operand layout of vdpbf16ps; converted and
// transposed 16 x 16 words at a time in registers), and
// an 8 x 48 tile of y (24 accumulators) is computed per pass over the block. Threads split the output
// columns; each output is summed in the same order whatever the thread count.
#include <immintrin.h>

#include "aot_matmul.h"
#include "threads.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BF16__)
#error "bf16_matmul needs AVX-512 F and BF16 (build with -mavx512f -mavx512bf16 -mavx512bw -mavx512vl)"
#endif

namespace {

int g_threads = 1;
constexpr int kRows = 8;              // rows of x per tile (6 x 4 measured the same, 4 x 6 half as fast)
constexpr int kVecs = 3;              // 16-column vectors per tile
constexpr int kCols = 16 * kVecs;     // output columns per tile
// pairs of K per block (2048 values): y is read and written once per block, so longer blocks pay less for it;
// measured at 7B shapes: 128 pairs 320 GFLOP/s, 512 390, 1024 405-425 (the panel, 192 KB, still in L2)
constexpr int64_t kPairs = 1024;

inline uint16_t round_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu)) return static_cast<uint16_t>((b >> 16) | 0x40);
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// 16 values of a row -> 16 bfloat16, rounded to nearest even
inline __m256i to_bf16(__m512 v) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)); }

// One row of `n` values starting at `src` (weight_type 0 float32, 1 float16, 2 bfloat16) -> bfloat16 `dst`.
void row_to_bf16(const void *src, int type, int64_t n, uint16_t *dst) {
  int64_t i = 0;
  if (type == 0) {
    const float *s = static_cast<const float *>(src);
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(dst + i), to_bf16(_mm512_loadu_ps(s + i)));
    for (; i < n; i++) dst[i] = round_bf16(s[i]);
  } else if (type == 1) {
    const uint16_t *s = static_cast<const uint16_t *>(src);
    for (; i + 16 <= n; i += 16) {
      __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(s + i)));
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(dst + i), to_bf16(v));
    }
    for (; i < n; i++) dst[i] = round_bf16(half_to_float(s[i]));
  } else {
    std::memcpy(dst, src, static_cast<size_t>(n) * 2);
  }
}

inline size_t type_size(int type) { return type == 0 ? 4 : 2; }

// The tile y[m0 .. m0+M, n0 .. n0+cols) = x_pairs(rows) . panel over `pairs` pairs, + y's values (add) or + the
// bias of its columns (bias, when not add); then + res's values at the tile's place (res, stride ldy: the last
// block of K passes it), so a residual is added to the finished sum, as a separate add would.
template <int M>
void tile(const uint32_t *a, int64_t a_stride, const uint32_t *panel, int64_t pairs, float *y, int64_t ldy, int cols,
          bool add, const float *bias, const float *res) {
  __m512 acc[M][kVecs];
  for (int m = 0; m < M; m++)
    for (int v = 0; v < kVecs; v++) acc[m][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; p++) {
    const uint32_t *b = panel + p * kCols;
    __m512bh bv[kVecs];
    for (int v = 0; v < kVecs; v++) bv[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + 16 * v));
    for (int m = 0; m < M; m++) {
      __m512bh av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[m * a_stride + p])));
      for (int v = 0; v < kVecs; v++) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], av, bv[v]);
    }
  }
  for (int m = 0; m < M; m++) {
    for (int v = 0; v < kVecs; v++) {
      int left = cols - 16 * v;
      if (left <= 0) break;
      __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
      float *dst = y + m * ldy + 16 * v;
      __m512 out = acc[m][v];
      if (add) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mask, dst));
      else if (bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mask, bias + 16 * v));
      if (res) out = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, res + m * ldy + 16 * v), out);
      _mm512_mask_storeu_ps(dst, mask, out);
    }
  }
}

void tile_rows(int rows, const uint32_t *a, int64_t a_stride, const uint32_t *panel, int64_t pairs, float *y,
               int64_t ldy, int cols, bool add, const float *bias, const float *res) {
  switch (rows) {
    case 1: tile<1>(a, a_stride, panel, pairs, y, ldy, cols, add, bias, res); break;
    case 2: tile<2>(a, a_stride, panel, pairs, y, ldy, cols, add, bias, res); break;
    case 3: tile<3>(a, a_stride, panel, pairs, y, ldy, cols, add, bias, res); break;
    case 4: tile<4>(a, a_stride, panel, pairs, y, ldy, cols, add, bias, res); break;
    case 5: tile<5>(a, a_stride, panel, pairs, y, ldy, cols, add, bias, res); break;
    case 6: tile<6>(a, a_stride, panel, pairs, y, ldy, cols, add, bias, res); break;
    case 7: tile<7>(a, a_stride, panel, pairs, y, ldy, cols, add, bias, res); break;
    default: tile<8>(a, a_stride, panel, pairs, y, ldy, cols, add, bias, res); break;
  }
}

// Transpose 16 x 16 32-bit words in place (r[i] = row i -> r[i] = column i).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; i++) {
      t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; i++) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// 32 values of `type` at src (2 x 16 along K) -> 16 bfloat16 pairs, rounded to nearest even as row_to_bf16's
// vector path rounds them (the same instruction's rounding), low value of each pair first.
inline __m512i pairs_of(const char *src, int type) {
  if (type == 2) return _mm512_loadu_si512(src);
  __m512 lo, hi;
  if (type == 0) {
    lo = _mm512_loadu_ps(reinterpret_cast<const float *>(src));
    hi = _mm512_loadu_ps(reinterpret_cast<const float *>(src) + 16);
  } else {
    lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(src)));
    hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(src) + 1));
  }
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// Output columns [n0, n1): for each block of K, pack 48 columns of w as pairs and run every row tile over it.
// A whole block (48 columns, whole 16-pair groups, no odd tail) is converted and transposed in registers straight
// from w; the rest goes through a zeroed buffer of bfloat16 rows (the lanes and pairs past w's edge are zero).
// Packing was ~7% of a 7B prefill matmul through the buffer (3.7 ms of a 594-row [4096 x 4096] call).
// panel: kPairs * kCols words; rows: the block's columns as bfloat16 rows, for blocks at w's edges (one thread's).
void part(const uint32_t *a, int64_t a_stride, const void *w, int type, const float *bias, const float *res, float *y,
          int64_t m_rows, int64_t n_out, int64_t k_in, int64_t n0, int64_t n1, std::vector<uint32_t> &panel,
          std::vector<uint32_t> &rows) {
  const char *wb = static_cast<const char *>(w);
  const int64_t item = static_cast<int64_t>(type_size(type)), row_bytes = k_in * item;
  for (int64_t p0 = 0; p0 < a_stride; p0 += kPairs) {
    int64_t pairs = a_stride - p0 < kPairs ? a_stride - p0 : kPairs;
    int64_t k0 = 2 * p0, k1 = k0 + 2 * pairs < k_in ? k0 + 2 * pairs : k_in;
    for (int64_t nb = n0; nb < n1; nb += kCols) {
      int cols = static_cast<int>(n1 - nb < kCols ? n1 - nb : kCols);
      const char *block = wb + nb * row_bytes + k0 * item;  // column nb's first value of this block of K
      const bool whole = cols == kCols && pairs % 16 == 0 && k1 - k0 == 2 * pairs;
      if (!whole) {
        rows.assign(static_cast<size_t>(kCols * kPairs), 0);
        for (int j = 0; j < cols; j++)
          row_to_bf16(block + j * row_bytes, type, k1 - k0, reinterpret_cast<uint16_t *>(rows.data() + j * kPairs));
      }
      for (int j0 = 0; j0 < kCols; j0 += 16) {
        for (int64_t q = 0; q < pairs; q += 16) {
          __m512i r[16];
          for (int i = 0; i < 16; i++)
            r[i] = whole ? pairs_of(block + (j0 + i) * row_bytes + 2 * q * item, type)
                         : _mm512_loadu_si512(rows.data() + (j0 + i) * kPairs + q);
          transpose16(r);
          for (int i = 0; i < 16; i++) _mm512_storeu_si512(panel.data() + (q + i) * kCols + j0, r[i]);
        }
      }
      for (int64_t m0 = 0; m0 < m_rows; m0 += kRows) {
        int rows_here = static_cast<int>(m_rows - m0 < kRows ? m_rows - m0 : kRows);
        const bool last = p0 + kPairs >= a_stride;
        tile_rows(rows_here, a + m0 * a_stride + p0, a_stride, panel.data(), pairs, y + m0 * n_out + nb, n_out,
                  cols, p0 > 0, bias ? bias + nb : nullptr, res && last ? res + m0 * n_out + nb : nullptr);
      }
    }
  }
}

}  // namespace

extern "C" void bf16_matmul_set_threads(int n) { g_threads = n < 1 ? 1 : n; }

// weight_type: 0 float32, 1 float16, 2 bfloat16; bias [N] float32 added to every row, or nullptr; res [M, N] float32
// added to the product (res + (x . w + bias), a residual), or nullptr.
int matmul_bias(const float *x, const void *w, const float *bias, const float *res, float *y, int64_t m_rows,
                int64_t n_out, int64_t k_in, int weight_type) {
  if (weight_type < 0 || weight_type > 2) return 4;
  int64_t a_stride = (k_in + 1) / 2;  // pairs per row of x
  // x as bfloat16 rows (an odd K's pad value 0), packed by all threads: one thread took ~2 ms of a 594-row call
  std::unique_ptr<uint16_t[]> a(new uint16_t[static_cast<size_t>(m_rows * a_stride * 2)]);
  on_threads(m_rows, kRows, g_threads, [&](auto take) {
    for (int64_t m0, m1; take(m0, m1);) {
      for (int64_t m = m0; m < m1; m++) {
        uint16_t *row = a.get() + m * a_stride * 2;
        row_to_bf16(x + m * k_in, 0, k_in, row);
        if (k_in % 2) row[k_in] = 0;
      }
    }
  });
  const uint32_t *pairs = reinterpret_cast<const uint32_t *>(a.get());
  // columns handed out 2 blocks at a time: 43 ranges at the 7B's 4096 columns, so the last one ends close to the join
  on_threads(n_out, 2 * kCols, g_threads, [&](auto take) {
    std::vector<uint32_t> panel(static_cast<size_t>(kPairs * kCols)), rows;
    for (int64_t n0, n1; take(n0, n1);)
      part(pairs, a_stride, w, weight_type, bias, res, y, m_rows, n_out, k_in, n0, n1, panel, rows);
  });
  return 0;
}

extern "C" int bf16_matmul(const float *x, const void *w, float *y, int64_t m_rows, int64_t n_out, int64_t k_in,
                           int weight_type) {
  return matmul_bias(x, w, nullptr, nullptr, y, m_rows, n_out, k_in, weight_type);
}

// n values of `type` (0 float32, 1 float16, 2 bfloat16) at src -> bfloat16 at dst, rounded to nearest even as the
// matmul rounds its operands (what verify's transformers side holds its Linear weights in), split over the threads.
// torch's float16 -> bfloat16 copy took 2.5x its float16 -> float32 one here (measured: 22-28 ms against 8-10 for
// a 4096 x 11008 matrix), and verify casts every decoder layer once per greedy token.
extern "C" int bf16_round(const void *src, int type, int64_t n, uint16_t *dst) {
  if (type < 0 || type > 2 || n < 0) return 4;
  const char *s = static_cast<const char *>(src);
  on_threads(n, 1 << 16, g_threads, [&](auto take) {  // whole cache lines of dst per range
    for (int64_t start, stop; take(start, stop);)
      row_to_bf16(s + start * type_size(type), type, stop - start, dst + start);
  });
  return 0;
}

// MindSpore's AOT custom-op entries (aot_matmul.h): x, w -> y, and x, w, bias [N] float32 -> y (the bias added
// as the first block of K is stored: MindSpore's broadcast add cost ~13 ms for a CLIP layer's [577, 4096] here).
AOT_MATMUL_ENTRY(Bf16Matmul, bf16_matmul)

// The (x, w, extra) -> y entries: x, w and y checked as every matmul entry checks them (aot_matmul.h), `extra` a
// float32 bias [N] (residual false) or residual [M, N] (residual true).
static int matmul_with(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool residual) {
  if (nparam != 4 || ndims[2] != (residual ? 2 : 1)) return 1;
  if (std::strcmp(dtypes[2], "float32") != 0) return 2;
  void *p[3] = {params[0], params[1], params[3]};
  int nd[3] = {ndims[0], ndims[1], ndims[3]};
  int64_t *sh[3] = {shapes[0], shapes[1], shapes[3]};
  const char *dt[3] = {dtypes[0], dtypes[1], dtypes[3]};
  MatmulArgs a;
  int refused = matmul_args(3, p, nd, sh, dt, &a);
  if (refused) return refused;
  if (residual ? shapes[2][0] != a.m_rows || shapes[2][1] != a.n_out : shapes[2][0] != a.n_out) return 3;
  const float *extra = static_cast<const float *>(params[2]);
  return matmul_bias(a.x, a.w, residual ? nullptr : extra, residual ? extra : nullptr, a.y, a.m_rows, a.n_out, a.k_in,
                     a.weight_type);
}

extern "C" int Bf16MatmulBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  return matmul_with(nparam, params, ndims, shapes, dtypes, false);
}

// x, w, res [M, N] float32 -> y = res + x . w (a decoder layer's residual added to wo's and w2's products: MindSpore's
// add cost ~3 ms each for a 7B prompt's [594, 4096] here, on one thread).
extern "C" int Bf16MatmulAdd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                             void *) {
  return matmul_with(nparam, params, ndims, shapes, dtypes, true);
}
