// A matmul kernel's MindSpore AOT custom-op entry and its argument checks, one copy for every kernel here:
// inputs x [M, K] float32 and w [N, K] (float32, float16 or bfloat16), output y [M, N] float32.
#pragma once

#include <cstdint>
#include <cstring>

struct MatmulArgs {
  const float *x;
  const void *w;
  float *y;
  int64_t m_rows, n_out, k_in;
  int weight_type;  // 0 float32, 1 float16, 2 bfloat16
};

// 0 with `out` filled, or why the call is refused: 1 ranks, 2 dtypes, 3 shapes.
inline int matmul_args(int nparam, void **params, const int *ndims, int64_t **shapes, const char **dtypes,
                       MatmulArgs *out) {
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 1;
  if (std::strcmp(dtypes[0], "float32") != 0 || std::strcmp(dtypes[2], "float32") != 0) return 2;
  int weight_type = std::strcmp(dtypes[1], "float32") == 0    ? 0
                    : std::strcmp(dtypes[1], "float16") == 0  ? 1
                    : std::strcmp(dtypes[1], "bfloat16") == 0 ? 2
                                                              : -1;
  if (weight_type < 0) return 2;
  int64_t m_rows = shapes[0][0], k_in = shapes[0][1], n_out = shapes[1][0];
  if (shapes[1][1] != k_in || shapes[2][0] != m_rows || shapes[2][1] != n_out) return 3;
  *out = MatmulArgs{static_cast<const float *>(params[0]), params[1], static_cast<float *>(params[2]), m_rows,
                    n_out, k_in, weight_type};
  return 0;
}

// The extern "C" entry `name` MindSpore's AOT loader calls: the arguments checked, then
// `kernel(x, w, y, m_rows, n_out, k_in, weight_type)`. Non-zero: refused.
#define AOT_MATMUL_ENTRY(name, kernel)                                                                       \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, \
                      void *extra) {                                                                         \
    (void)stream;                                                                                            \
    (void)extra;                                                                                             \
    MatmulArgs a;                                                                                            \
    int refused = matmul_args(nparam, params, ndims, shapes, dtypes, &a);                                    \
    return refused ? refused : kernel(a.x, a.w, a.y, a.m_rows, a.n_out, a.k_in, a.weight_type);             \
  }
