/* Heron's few-row fp32 product over input-major weights (the why: stream.c), shared by
 * stream.c (the product alone) and step.c (inside a decoding layer). */
#ifndef HERON_STREAM_MM_H
#define HERON_STREAM_MM_H

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8          /* rows of x: past 8 the partial sums outgrow the cache (below) */
/* Which four rows of a thread's block of Wt a pass reads, and how far ahead it prefetches.
 * Rows at least SPLIT_N floats wide: four adjacent rows, prefetching two rows ahead. Narrower rows:
 * one row from each quarter of the block, prefetching SPLIT_AHEAD floats (8 KB) ahead in each.
 * Why (Zen 4, 2026-12-03, two threads, interleaved rounds): four adjacent rows of 512 floats are
 * one short run of memory a pass, and streamed 18-21 GB/s where the wide products reached 26-30;
 * four quarters are four long runs and streamed the narrow shapes 1.2-1.3x as fast (512 x 512 22.7
 * GB/s against 18.5, 1376 x 512 25.5 against 20.1, 2048 x 768 28.9 against 23.6), 1024 wide 1.09x,
 * 1536 and 2304 wide within 5% either way, and 2752 wide and more 12-20% slower. Prefetching 4 KB
 * ahead (as until then) left the wide products slow: two rows ahead streamed 512 x 2752 at 25.9
 * GB/s against 23.6 and the 512 x 4096 head at 27.1 against 24.7; four rows ahead about as well,
 * eight slightly worse. On the Zen 5 host the 4 KB distance streamed 44-47 GB/s, 43-44 without
 * prefetch. Prefetches go to L2 (locality 2: prefetcht1), not L1: over 32 copies of a `small`
 * layer's four products (101 MB) two threads streamed 26-34 GB/s where prefetching into L1 read
 * 19-27 (Zen 4, 2026-12-03, processes alternating; into L3 about as L2, non-temporal as L1). */
#define SPLIT_N 2048
#define SPLIT_AHEAD 2048
#define PREFETCH_ROWS 2

/* 16 floats at any float's address (unaligned loads and stores), read through float pointers */
typedef float vec16 __attribute__((vector_size(64), aligned(4), may_alias));
#define AT(p) (*(vec16 *)(p))
#define AT_CONST(p) (*(const vec16 *)(p))

/* acc (M, N) += x[:, k0:k1] @ Wt[k0:k1, :], four rows of Wt a pass: rows k, k + S, k + 2S, k + 3S
 * (S = 1, adjacent, or a quarter of the block: SPLIT_N above). */
#define ROWS_INTO(NAME, TARGET)                                                                              \
    __attribute__((target(TARGET))) static void NAME(const float *x, int64_t M, int64_t K, const float *wt,  \
                                                     int64_t N, int64_t k0, int64_t k1, float *acc) {        \
        const int64_t passes = (k1 - k0) / 4, split = N < SPLIT_N;                                           \
        const int64_t S = split ? passes : 1, step = split ? 1 : 4;                                          \
        const int64_t ahead = split ? SPLIT_AHEAD : PREFETCH_ROWS * N;                                       \
        for (int64_t p = 0; p < passes; p++) {                                                               \
            const int64_t k = k0 + p * step;                                                                 \
            const float *w0 = wt + k * N, *w1 = w0 + S * N, *w2 = w1 + S * N, *w3 = w2 + S * N;              \
            for (int64_t m = 0; m < M; m++) {                                                                \
                const float *xm = x + m * K + k;                                                             \
                const float x0 = xm[0], x1 = xm[S], x2 = xm[2 * S], x3 = xm[3 * S];                          \
                const vec16 a = (vec16){} + x0, b = (vec16){} + x1, c = (vec16){} + x2, d = (vec16){} + x3;  \
                float *y = acc + m * N;                                                                      \
                int64_t n = 0;                                                                               \
                for (; n + 16 <= N; n += 16) {                                                               \
                    if (m == 0) {                                                                            \
                        __builtin_prefetch(w0 + n + ahead, 0, 2);                                              \
                        __builtin_prefetch(w1 + n + ahead, 0, 2);                                              \
                        __builtin_prefetch(w2 + n + ahead, 0, 2);                                              \
                        __builtin_prefetch(w3 + n + ahead, 0, 2);                                              \
                    }                                                                                        \
                    vec16 s = AT(y + n);                                                                     \
                    s += a * AT_CONST(w0 + n);                                                               \
                    s += b * AT_CONST(w1 + n);                                                               \
                    s += c * AT_CONST(w2 + n);                                                               \
                    s += d * AT_CONST(w3 + n);                                                               \
                    AT(y + n) = s;                                                                           \
                }                                                                                            \
                for (; n < N; n++) y[n] += x0 * w0[n] + x1 * w1[n] + x2 * w2[n] + x3 * w3[n];                \
            }                                                                                                \
        }                                                                                                    \
        for (int64_t k = k0 + 4 * passes; k < k1; k++)                                                       \
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
