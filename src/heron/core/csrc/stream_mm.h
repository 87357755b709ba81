/* Heron's few-row fp32 product over input-major weights (the why: stream.c), shared by
 * stream.c (the product alone) and step.c (inside a decoding layer). */
#ifndef HERON_STREAM_MM_H
#define HERON_STREAM_MM_H

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8          /* rows of x: past 8 the partial sums outgrow the cache (below) */
/* Software prefetch reaches the floats PREFETCH_ROWS rows of Wt ahead of those being read, and at
 * least PREFETCH_MIN floats (4 KB) ahead. On the Zen 5 host 4 KB ahead streamed 44-47 GB/s, 43-44
 * without prefetch; on a Zen 4 (2026-12-03, two threads, 30 interleaved rounds) 4 KB ahead left the
 * wide products slow: two rows ahead streamed 512 x 2752 at 25.9 GB/s against 23.6, 512 x 1536 at
 * 25.3 against 23.6 and 512 x 4096 at 27.1 against 24.7 (512 wide: the same 4 KB, tied), where four
 * rows ahead (the next group) did about as well and eight slightly worse. */
#define PREFETCH_ROWS 2
#define PREFETCH_MIN 1024

/* 16 floats at any float's address (unaligned loads and stores), read through float pointers */
typedef float vec16 __attribute__((vector_size(64), aligned(4), may_alias));
#define AT(p) (*(vec16 *)(p))
#define AT_CONST(p) (*(const vec16 *)(p))

/* acc (M, N) += x[:, k0:k1] @ Wt[k0:k1, :], four rows of Wt at a time. */
#define ROWS_INTO(NAME, TARGET)                                                                              \
    __attribute__((target(TARGET))) static void NAME(const float *x, int64_t M, int64_t K, const float *wt,  \
                                                     int64_t N, int64_t k0, int64_t k1, float *acc) {        \
        const int64_t ahead = PREFETCH_ROWS * N > PREFETCH_MIN ? PREFETCH_ROWS * N : PREFETCH_MIN;           \
        int64_t k = k0;                                                                                      \
        for (; k + 4 <= k1; k += 4) {                                                                        \
            const float *w0 = wt + k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;                          \
            for (int64_t m = 0; m < M; m++) {                                                                \
                const float *xm = x + m * K + k;                                                             \
                const vec16 a = (vec16){} + xm[0], b = (vec16){} + xm[1], c = (vec16){} + xm[2],             \
                            d = (vec16){} + xm[3];                                                           \
                float *y = acc + m * N;                                                                      \
                int64_t n = 0;                                                                               \
                for (; n + 16 <= N; n += 16) {                                                               \
                    if (m == 0) {                                                                            \
                        __builtin_prefetch(w0 + n + ahead);                                                 \
                        __builtin_prefetch(w1 + n + ahead);                                                 \
                        __builtin_prefetch(w2 + n + ahead);                                                 \
                        __builtin_prefetch(w3 + n + ahead);                                                 \
                    }                                                                                        \
                    vec16 s = AT(y + n);                                                                     \
                    s += a * AT_CONST(w0 + n);                                                               \
                    s += b * AT_CONST(w1 + n);                                                               \
                    s += c * AT_CONST(w2 + n);                                                               \
                    s += d * AT_CONST(w3 + n);                                                               \
                    AT(y + n) = s;                                                                           \
                }                                                                                            \
                for (; n < N; n++) y[n] += xm[0] * w0[n] + xm[1] * w1[n] + xm[2] * w2[n] + xm[3] * w3[n];    \
            }                                                                                                \
        }                                                                                                    \
        for (; k < k1; k++)                                                                                  \
            for (int64_t m = 0; m < M; m++)                                                                  \
                for (int64_t n = 0; n < N; n++) acc[m * N + n] += x[m * K + k] * wt[k * N + n];              \
    }

ROWS_INTO(rows_into_avx512, "avx512f")
ROWS_INTO(rows_into_avx2, "avx2,fma")

typedef void (*rows_into_fn)(const float *, int64_t, int64_t, const float *, int64_t, int64_t, int64_t, float *);

static rows_into_fn pick(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return rows_into_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return rows_into_avx2;
    return NULL;
}

/* y (M, N) = x (M, K) @ Wt (K, N); nonzero when the partial sums could not be allocated. */
static int stream_mm(rows_into_fn rows_into, const float *x, int64_t M, const float *wt, int64_t N, int64_t K,
                     float *y, int threads) {
    float *partial = malloc(sizeof(float) * (size_t)threads * M * N);
    if (partial == NULL) return 1;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        float *acc = partial + (int64_t)t * M * N;
        memset(acc, 0, sizeof(float) * M * N);
        rows_into(x, M, K, wt, N, K * t / T, K * (t + 1) / T, acc);
#pragma omp barrier
        for (int64_t i = M * N * t / T; i < M * N * (t + 1) / T; i++) { /* each thread sums a slice of y */
            float s = 0;
            for (int u = 0; u < T; u++) s += partial[(int64_t)u * M * N + i];
            y[i] = s;
        }
    }
    free(partial);
    return 0;
}

#endif
