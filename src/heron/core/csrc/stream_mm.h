/* Heron's few-row fp32 product over input-major weights (the why: stream.c), shared by
 * stream.c (the product alone) and step.c (inside a decoding layer). */
#ifndef HERON_STREAM_MM_H
#define HERON_STREAM_MM_H

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 64         /* rows of x (past 8 in register tiles of up to 8 rows each: below); core/linear.py's
                               * STREAM_ROWS says how many decoding sends here */
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

/* Six rows of x or more: register tiles. The pass below, over four rows of Wt for one row of x
 * at a time, reads each weight once from memory and M - 1 times more from cache, and loads and
 * stores the partial sums around every four multiply-adds: at 8 rows two Zen 4 threads multiplied
 * at 60-100 GFLOPS over cached weights, a third of their peak. Here a tile of the partial sums (up
 * to 8 rows of x times 2 vectors of 16 columns on AVX-512, 4 x 1 on AVX2's 16 registers) stays in
 * registers while the tile's columns of a block of TILE_K rows of Wt pass through, each weight
 * vector loaded once for all the tile's rows; each row of the block is read tile by tile, a stream
 * of its own, prefetched TILE_AHEAD floats ahead. Over cached weights 8 rows ran at 145-164
 * GFLOPS. Streaming a `small` model's weights from memory the tiles read them less well than the
 * passes, so they pay only where the multiply-adds dominate (Zen 4, 2026-12-03, decoding steps of a
 * `small`-shaped model, 4 alternating runs): 8 rows 8.3 against 9.8 ms a step (1.17x), 6 rows 7.7
 * against 8.5; 2 rows took 6.1-6.6 ms against 4.8-5.3 and 4 rows about the same, so below
 * TILED_ROWS the passes stay. Prefetching the next block as one contiguous run, or blocks of 4 or
 * 16 rows, did no better. */
#define TILE_K 64
#define TILE_AHEAD 256
#define TILE_STRIP 1024 /* columns of Wt a strip (TILES_INTO); a multiple of every tile's width */

/* acc[:, n0:n1] (MC rows of N) += x[:, k0:k1] @ Wt[k0:k1, n0:n1] for a constant MC <= the target's group,
 * NT vectors a tile. */
#define TILE_GROUP_INTO(NAME, TARGET, NT)                                                                    \
    __attribute__((target(TARGET), always_inline)) static inline void NAME(                                  \
        const int MC, const float *x, int64_t K, const float *wt, int64_t N, int64_t k0, int64_t k1,         \
        int64_t n0, int64_t n1, float *acc) {                                                                \
        int64_t n = n0;                                                                                      \
        for (; n + 16 * NT <= n1; n += 16 * NT) {                                                            \
            vec16 t[8][NT]; /* a fixed size (not MC's VLA), so the tile stays in registers */                \
            for (int m = 0; m < MC; m++)                                                                     \
                for (int j = 0; j < NT; j++) t[m][j] = (vec16){};                                            \
            for (int64_t k = k0; k < k1; k++) {                                                              \
                const float *w = wt + k * N + n;                                                             \
                for (int j = 0; j < NT; j++) __builtin_prefetch(w + TILE_AHEAD + 16 * j, 0, 2);              \
                vec16 wv[NT];                                                                                \
                for (int j = 0; j < NT; j++) wv[j] = AT_CONST(w + 16 * j);                                   \
                for (int m = 0; m < MC; m++) {                                                               \
                    const vec16 xv = (vec16){} + x[m * K + k];                                               \
                    for (int j = 0; j < NT; j++) t[m][j] += xv * wv[j];                                      \
                }                                                                                            \
            }                                                                                                \
            for (int m = 0; m < MC; m++)                                                                     \
                for (int j = 0; j < NT; j++) AT(acc + m * N + n + 16 * j) += t[m][j];                        \
        }                                                                                                    \
        for (int64_t k = k0; k < k1; k++)                                                                    \
            for (int m = 0; m < MC; m++)                                                                     \
                for (int64_t c = n; c < n1; c++) acc[m * N + c] += x[m * K + k] * wt[k * N + c];             \
    }

/* acc (M, N) += x[:, k0:k1] @ Wt[k0:k1, :] in groups of up to GROUP rows of x, each through its
 * register tiles (GROUP_INTO, specialised for the group's size), block by block of TILE_K rows of
 * Wt and strip by strip of TILE_STRIP columns: the groups take each strip of a block in turn, so
 * the first reads it from memory and the others from cache (64 x 1,024 floats, 256 KB, within the
 * L2 of a Zen 4 core, whatever the weight's width: a `base`-shaped model with a 32,000-token head
 * decoded 16 rows 1.06x as fast as with whole rows of a block a group, the `small` one alike). The
 * groups are as even as can be (9 rows: 5 and 4), since a group of a row or two uses its registers
 * poorly. */
#define TILES_INTO(NAME, TARGET, GROUP_INTO, GROUP)                                                          \
    __attribute__((target(TARGET))) static void NAME(const float *x, int64_t M, int64_t K, const float *wt,  \
                                                     int64_t N, int64_t k0, int64_t k1, float *acc) {        \
        const int64_t groups = (M + GROUP - 1) / GROUP;                                                      \
        for (int64_t kb = k0; kb < k1; kb += TILE_K) {                                                       \
            const int64_t ke = kb + TILE_K < k1 ? kb + TILE_K : k1;                                          \
            for (int64_t n0 = 0; n0 < N; n0 += TILE_STRIP) {                                                 \
                const int64_t n1 = n0 + TILE_STRIP < N ? n0 + TILE_STRIP : N;                                \
                for (int64_t g = 0; g < groups; g++) {                                                       \
                    const int64_t m0 = M * g / groups, rows = M * (g + 1) / groups - m0;                     \
                    const float *xg = x + m0 * K;                                                            \
                    float *ag = acc + m0 * N;                                                                \
                    switch (rows) {                                                                          \
                    case 1: GROUP_INTO(1, xg, K, wt, N, kb, ke, n0, n1, ag); break;                          \
                    case 2: GROUP_INTO(2, xg, K, wt, N, kb, ke, n0, n1, ag); break;                          \
                    case 3: GROUP_INTO(3, xg, K, wt, N, kb, ke, n0, n1, ag); break;                          \
                    case 4: GROUP_INTO(4, xg, K, wt, N, kb, ke, n0, n1, ag); break;                          \
                    case 5: GROUP_INTO(5, xg, K, wt, N, kb, ke, n0, n1, ag); break;                          \
                    case 6: GROUP_INTO(6, xg, K, wt, N, kb, ke, n0, n1, ag); break;                          \
                    case 7: GROUP_INTO(7, xg, K, wt, N, kb, ke, n0, n1, ag); break;                          \
                    default: GROUP_INTO(8, xg, K, wt, N, kb, ke, n0, n1, ag); break;                         \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

/* 8 rows x 2 vectors of partial sums (16 of AVX-512's 32 registers); AVX2's 16 registers hold
 * 4 rows x 1 vector (two ymm each). */
TILE_GROUP_INTO(group_into_avx512, "avx512f", 2)
TILE_GROUP_INTO(group_into_avx2, "avx2,fma", 1)
TILES_INTO(tiles_into_avx512, "avx512f", group_into_avx512, 8)
TILES_INTO(tiles_into_avx2, "avx2,fma", group_into_avx2, 4)

#define TILED_ROWS 6 /* rows of x from which the register tiles run (above: why not fewer) */

/* acc (M, N) += x[:, k0:k1] @ Wt[k0:k1, :], four rows of Wt a pass: rows k, k + S, k + 2S, k + 3S
 * (S = 1, adjacent, or a quarter of the block: SPLIT_N above); from TILED_ROWS rows, the tiles. */
#define ROWS_INTO(NAME, TARGET, TILES)                                                                       \
    __attribute__((target(TARGET))) static void NAME(const float *x, int64_t M, int64_t K, const float *wt,  \
                                                     int64_t N, int64_t k0, int64_t k1, float *acc) {        \
        if (M >= TILED_ROWS) {                                                                               \
            TILES(x, M, K, wt, N, k0, k1, acc);                                                              \
            return;                                                                                          \
        }                                                                                                    \
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

ROWS_INTO(rows_into_avx512, "avx512f", tiles_into_avx512)
ROWS_INTO(rows_into_avx2, "avx2,fma", tiles_into_avx2)

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
