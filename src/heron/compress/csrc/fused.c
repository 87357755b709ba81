/* Heron's fused dequantise-and-multiply for weight-only int8 and int4 linears on
 * x86 CPUs with AVX2 and FMA: y = x @ Ŵᵀ, x (M, K) fp32, y (M, N) fp32, with
 * accumulation in fp32, for
 *   int8: Ŵ = scale[n] * W[n, k], W int8 codes (N, K) row-major, scale (N,);
 *   int4: Ŵ = scale[n, g] * (q[n, k] - zero[n, g]) over groups g of a multiple
 *         of 32 inputs, q 0..15 packed two a byte in blocks of 32 inputs: byte
 *         j of a block holds input j in its low nibble and input 16 + j in its
 *         high one (kernels.py repacks Heron's checkpoint layout into this).
 *
 * Why: PyTorch ships no vectorised weight-only int8 or int4 product for AVX2
 * CPUs (`_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` are scalar
 * loops there), and the fp16-weight GEMM it does ship reads two bytes a
 * weight. Decoding is a stream of weights, so reading the codes as stored and
 * widening them in registers is what makes int8 decode faster than fp32 and
 * than quantize_dynamic, which rounds activations.
 *
 * Two paths, both parallel over output rows with OpenMP (the runtime torch
 * already loaded, so both share one thread pool):
 *   - few rows (decoding; up to 63 rows, int4 on AVX2 16): codes are widened to fp32 in registers
 *     and multiplied into up to 4 rows of x at a time: one pass over the
 *     weights from memory, one byte (int8) or half a byte (int4) a weight,
 *     16 codes an instruction on AVX-512 CPUs, 8 on AVX2 ones.
 *   - many rows (prefill): 4 weight rows at a time are dequantised once into a
 *     per-thread fp32 buffer and multiplied into blocks of 3 rows of x, a
 *     12-accumulator tile. At 64 and 512 rows this took 1.2-1.9x the time of
 *     fbgemm's fp16-weight GEMM (about fp32's time). The usual 6 x 16 GEMM
 *     micro-kernel on k-major panels was slower (2026-11-30): 2.4-3.4x with
 *     16 rows widened into a transposed buffer, 2.5x with the codes repacked
 *     k-major in panels of 16 rows and widened on the fly. compress/kernels.py
 *     runs it up to 63 rows; from 64 it has `dequantize` write Ŵ in fp32 for
 *     torch's GEMM, which beats this path by more than dequantising costs.
 * The kernel functions carry their own target attribute, so importing the
 * module on a CPU without AVX2 is safe; callers check the CPU first.
 *
 * `product` offers the same product to the core's whole-layer decoding kernel
 * (core/csrc/step.c, through core/csrc/product.h), so that a quantised layer
 * decodes in one C call as an fp32 one does. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "../../core/csrc/fastcall_args.h"
#include "../../core/csrc/product.h"

/* A quantised weight matrix (N, K): see the top of the file for each layout. */
typedef struct {
    int bits;            /* 8 or 4 */
    const void *codes;   /* int8 (N, K), or int4 packed (N, K / 2) */
    const float *scale;  /* int8 (N,), int4 (N, K / group) */
    const int32_t *zero; /* int4 (N, K / group); NULL for int8 */
    int64_t N, K, group; /* group: int4 only, a multiple of 32 */
} QWeights;

static int AVX512_HERE; /* whether this CPU runs the AVX-512 tiles: set when the module loads */

typedef void (*few_rows_fn)(const float *x, const QWeights *w, float *y, int64_t n0, int64_t n1);

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#define INLINE static inline __attribute__((always_inline))

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 codes from memory to fp32: the load folds into the sign extension (vpmovsxbd ymm, m64). */
INLINE __m256 widen8(const int8_t *codes) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)codes)));
}

/* Few rows: y[m, n + r] for m < MR, r < R, widening the codes in registers. Each
 * (m, r) keeps two accumulators, for the low and high 8 of every 16 codes, so
 * that 2 x MR x R FMA chains run side by side instead of waiting on one another. */
INLINE void int8_codes_step(const float *x, const int MR, const int R, int64_t K, const int8_t *codes,
                       __m256 lo[4][4], __m256 hi[4][4]) {
    for (int r = 0; r < R; r++) {
        __m256 a = widen8(codes + r * K), b = widen8(codes + r * K + 8);
        for (int m = 0; m < MR; m++) {
            lo[m][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K), a, lo[m][r]);
            hi[m][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + 8), b, hi[m][r]);
        }
    }
}

/* Bytes ahead of the codes being read at which the next cache lines are
 * requested, into L2 (PREFETCH_INTO): with hardware prefetch alone two threads
 * streamed 11-14 GB/s of codes from memory here, prefetching 4 KB ahead into
 * L1 15-19 GB/s (AMD EPYC, 2026-11-30). Into L2, 8 KB ahead: 19-25 GB/s of
 * int8 codes where L1 read 9-13 (Zen 4 EPYC, 2026-12-03, a C harness over 32
 * copies of a `small` layer's four products, 101 MB; 4 KB into L2 11-17, 16
 * KB 20-25): L1 has far fewer slots for lines on their way than L2, so
 * prefetches into L1 stall the stream. int4, bound by its arithmetic, the same
 * either way. */
#define PREFETCH_AHEAD 8192
#define PREFETCH_INTO _MM_HINT_T1

INLINE void int8_codes_tile(const float *x, const int MR, const int R, int64_t K, const int8_t *w,
                       const float *scale, float *y, int64_t ldy, int64_t n) {
    __m256 lo[4][4], hi[4][4];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) lo[m][r] = hi[m][r] = _mm256_setzero_ps();
    const int8_t *rows = w + n * K;
    const int64_t K64 = K & ~(int64_t)63, K16 = K & ~(int64_t)15;
    int64_t k = 0;
    for (; k < K64; k += 64) {  /* a cache line of each row per pass, and one prefetch of each */
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(rows + r * K + k + PREFETCH_AHEAD), PREFETCH_INTO);
        for (int j = 0; j < 64; j += 16) int8_codes_step(x + k + j, MR, R, K, rows + k + j, lo, hi);
    }
    for (; k < K16; k += 16) int8_codes_step(x + k, MR, R, K, rows + k, lo, hi);
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) {
            const int8_t *row = rows + r * K;
            float s = hsum(_mm256_add_ps(lo[m][r], hi[m][r]));
            for (k = K16; k < K; k++) s += x[m * K + k] * (float)row[k];
            y[m * ldy + n + r] = s * scale[n + r];
        }
}

/* One block of 32 int4 codes (16 bytes: low nibbles inputs 0-15, high 16-31)
 * minus the zero point, as 4 x 8 fp32: the subtraction is in integers, exact. */
INLINE void int4_widen32(const uint8_t *block, __m256i zero, __m256 out[4]) {
    const __m128i nibble = _mm_set1_epi8(0x0F), q = _mm_loadu_si128((const __m128i *)block);
    const __m128i lo = _mm_and_si128(q, nibble), hi = _mm_and_si128(_mm_srli_epi16(q, 4), nibble);
    out[0] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(lo), zero));
    out[1] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo)), zero));
    out[2] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(hi), zero));
    out[3] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi)), zero));
}

/* int4, few rows: y[m, n + r] for m < MR, r < R. Each block of 32 inputs is
 * 16 bytes: low nibbles inputs 0-15, high nibbles 16-31; the group's zero point
 * is subtracted in integers (exact) and the group's fp32 sum scaled into `total`. */
INLINE void int4_codes_tile(const float *x, const int MR, const int R, int64_t K, int64_t group, const uint8_t *packed,
                      const float *scale, const int32_t *zero, float *y, int64_t ldy, int64_t n) {
    const int64_t G = K / group, row_bytes = K / 2;
    __m256 total[4][4];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) total[m][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 acc[4][4];
        __m256i z[4];
        for (int r = 0; r < R; r++) z[r] = _mm256_set1_epi32(zero[(n + r) * G + g]);
        for (int m = 0; m < MR; m++)
            for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
            for (int r = 0; r < R; r++) {
                const uint8_t *block = packed + (n + r) * row_bytes + k / 2;
                if ((k & 127) == 0) _mm_prefetch((const char *)(block + PREFETCH_AHEAD), PREFETCH_INTO);
                __m256 v[4];
                int4_widen32(block, z[r], v);
                for (int m = 0; m < MR; m++) {
                    const float *xk = x + m * K + k;
                    __m256 a = _mm256_fmadd_ps(_mm256_loadu_ps(xk), v[0], acc[m][r]);
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(xk + 8), v[1], a);
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(xk + 16), v[2], a);
                    acc[m][r] = _mm256_fmadd_ps(_mm256_loadu_ps(xk + 24), v[3], a);
                }
            }
        }
        for (int m = 0; m < MR; m++)
            for (int r = 0; r < R; r++)
                total[m][r] = _mm256_fmadd_ps(acc[m][r], _mm256_set1_ps(scale[(n + r) * G + g]), total[m][r]);
    }
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) y[m * ldy + n + r] = hsum(total[m][r]);
}

/* Both tiles behind one signature, so that one macro makes every few-rows function. */
INLINE void int8_tile(const float *x, const int MR, const int R, const QWeights *w, float *y, int64_t n) {
    int8_codes_tile(x, MR, R, w->K, w->codes, w->scale, y, w->N, n);
}
INLINE void int4_tile(const float *x, const int MR, const int R, const QWeights *w, float *y, int64_t n) {
    int4_codes_tile(x, MR, R, w->K, w->group, w->codes, w->scale, w->zero, y, w->N, n);
}

#define FEW_ROWS(TILE, MR, R)                                                                            \
    static void TILE##_few_rows_##MR(const float *x, const QWeights *w, float *y, int64_t n0, int64_t n1) { \
        int64_t n = n0;                                                                                  \
        for (; n + R <= n1; n += R) TILE(x, MR, R, w, y, n);                                             \
        for (; n < n1; n++) TILE(x, MR, 1, w, y, n);                                                     \
    }
/* 2 x MR x R accumulators: at most 12 of the 16 vector registers */
FEW_ROWS(int8_tile, 1, 4) FEW_ROWS(int8_tile, 2, 3) FEW_ROWS(int8_tile, 3, 2) FEW_ROWS(int8_tile, 4, 1)
FEW_ROWS(int4_tile, 1, 4) FEW_ROWS(int4_tile, 2, 3) FEW_ROWS(int4_tile, 3, 2) FEW_ROWS(int4_tile, 4, 1)

#define FEW_ROWS_MAX 4
static const few_rows_fn INT8_FEW_ROWS_BY_M[FEW_ROWS_MAX + 1] = {
    NULL, int8_tile_few_rows_1, int8_tile_few_rows_2, int8_tile_few_rows_3, int8_tile_few_rows_4};
static const few_rows_fn INT4_FEW_ROWS_BY_M[FEW_ROWS_MAX + 1] = {
    NULL, int4_tile_few_rows_1, int4_tile_few_rows_2, int4_tile_few_rows_3, int4_tile_few_rows_4};

#pragma GCC pop_options

/* ---- The few-rows tiles again for AVX-512 CPUs, 16 lanes wide ----
 * Why: on the Zen 4 host the AVX2 tiles, once the codes came from L2 (PREFETCH_INTO), were bound by
 * their arithmetic: ~20 G int8 codes and ~12 G int4 codes a second on one thread with the weights in
 * cache, where here one instruction widens 16 codes, not 8. Over 32 copies of a `small` layer's
 * products (a C harness, 2026-12-03, two threads) int8 streamed 21-25 GB/s of codes where the AVX2
 * tiles read 15-21; int4 as below. */
#pragma GCC push_options
#pragma GCC target("avx512f")

#define TILE_R_512 8 /* weight rows a tile takes at most (below) */

/* 16 codes from memory to fp32: the load folds into the sign extension (vpmovsxbd zmm, m128). */
INLINE __m512 widen16(const int8_t *codes) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes)));
}

/* int8, as int8_codes_step over 32 codes: two accumulators a (m, r), for codes 0-15 and 16-31. */
INLINE void int8_codes_step_512(const float *x, const int MR, const int R, int64_t K, const int8_t *codes,
                                __m512 lo[4][TILE_R_512], __m512 hi[4][TILE_R_512]) {
    for (int r = 0; r < R; r++) {
        __m512 a = widen16(codes + r * K), b = widen16(codes + r * K + 16);
        for (int m = 0; m < MR; m++) {
            lo[m][r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K), a, lo[m][r]);
            hi[m][r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + 16), b, hi[m][r]);
        }
    }
}

INLINE void int8_tile_512(const float *x, const int MR, const int R, const QWeights *w, float *y, int64_t n) {
    const int64_t K = w->K, K64 = K & ~(int64_t)63, K32 = K & ~(int64_t)31;
    const int8_t *rows = (const int8_t *)w->codes + n * K;
    __m512 lo[4][TILE_R_512], hi[4][TILE_R_512];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) lo[m][r] = hi[m][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K64; k += 64) {
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(rows + r * K + k + PREFETCH_AHEAD), PREFETCH_INTO);
        int8_codes_step_512(x + k, MR, R, K, rows + k, lo, hi);
        int8_codes_step_512(x + k + 32, MR, R, K, rows + k + 32, lo, hi);
    }
    for (; k < K32; k += 32) int8_codes_step_512(x + k, MR, R, K, rows + k, lo, hi);
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) {
            const int8_t *row = rows + r * K;
            float s = _mm512_reduce_add_ps(_mm512_add_ps(lo[m][r], hi[m][r]));
            for (k = K32; k < K; k++) s += x[m * K + k] * (float)row[k];
            y[m * w->N + n + r] = s * w->scale[n + r];
        }
}

/* int4: each row's group dequantised once into a table of its 16 possible weights, s * (q - z) for
 * q = 0..15 (the reference's formula, so the same fp32 weights), and each code looked up in it: the
 * 16 bytes of a block of 32 inputs widened to 16 lanes, whose low 4 bits (the low nibbles: inputs 0-15)
 * index the table as they are (vpermps reads only those) and, shifted right by 4, give the high
 * nibbles (inputs 16-31). Per 32 weights a row: a widening, a shift, two lookups and two FMAs, where
 * masking, widening, subtracting and converting each half took nine and a scale every group; over
 * 32 copies of a `small` layer's products (C harness, 2026-12-03, two threads) 28-30 G weights a
 * second against 19-22, with the weights in cache 21-22 on one thread against 15. */
INLINE void int4_tile_512(const float *x, const int MR, const int R, const QWeights *w, float *y, int64_t n) {
    const int64_t K = w->K, G = K / w->group, row_bytes = K / 2;
    const __m512i codes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc[4][TILE_R_512];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 table[TILE_R_512];
        for (int r = 0; r < R; r++) {
            const int64_t i = (n + r) * G + g;
            const __m512i shifted = _mm512_sub_epi32(codes, _mm512_set1_epi32(w->zero[i]));
            table[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(shifted), _mm512_set1_ps(w->scale[i]));
        }
        for (int64_t k = g * w->group; k < (g + 1) * w->group; k += 32) {
            for (int r = 0; r < R; r++) {
                const uint8_t *block = (const uint8_t *)w->codes + (n + r) * row_bytes + k / 2;
                if ((k & 127) == 0) _mm_prefetch((const char *)(block + PREFETCH_AHEAD), PREFETCH_INTO);
                const __m512i lanes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)block));
                const __m512 low = _mm512_permutexvar_ps(lanes, table[r]);
                const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(lanes, 4), table[r]);
                for (int m = 0; m < MR; m++) {
                    acc[m][r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), low, acc[m][r]);
                    acc[m][r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k + 16), high, acc[m][r]);
                }
            }
        }
    }
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) y[m * w->N + n + r] = _mm512_reduce_add_ps(acc[m][r]);
}

/* int8: 2 x MR x R accumulators, as the AVX2 tiles. int4: MR x R accumulators beside R tables, up to 18
 * of the 32 vector registers, where the AVX2 tiles' shapes took 1 weight row for 4 rows of x (8 loads
 * of x for 8 FMAs): over 32 copies of a `small` layer's products (two threads, in-process A/B, 12
 * rounds) 1.14x, 1.16x and 1.20x as fast at 4, 8 and 16 rows, 1.03x at 1. The same wider tiles slowed
 * int8 by 5-13% (its widening, not its loads, bounds it), and so did 2 weight rows for 4 rows of x. */
FEW_ROWS(int8_tile_512, 1, 4) FEW_ROWS(int8_tile_512, 2, 3) FEW_ROWS(int8_tile_512, 3, 2) FEW_ROWS(int8_tile_512, 4, 1)
FEW_ROWS(int4_tile_512, 1, 8) FEW_ROWS(int4_tile_512, 2, 6) FEW_ROWS(int4_tile_512, 3, 4) FEW_ROWS(int4_tile_512, 4, 3)

/* int8, 5 to 8 rows of x: one accumulator a (m, r) over 16 codes, 2 weight rows a tile (16 accumulators),
 * so each widened code serves up to 8 rows of x, not 4. Over 32 copies of a `small` layer's products
 * (two threads, in-process A/B, 12 rounds, Zen 4, 2026-12-03): 5, 8, 16 and 32 rows 1.13x, 1.07x, 1.09x
 * and 1.07x as fast as tiles of 4 rows; 3 weight rows a tile no better (1.04-1.11x). */
INLINE void int8_tile8_512(const float *x, const int MR, const int R, const QWeights *w, float *y, int64_t n) {
    const int64_t K = w->K, K64 = K & ~(int64_t)63, K16 = K & ~(int64_t)15;
    const int8_t *rows = (const int8_t *)w->codes + n * K;
    __m512 acc[8][2];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K16; k += 16) {
        if (k < K64 && (k & 63) == 0)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(rows + r * K + k + PREFETCH_AHEAD), PREFETCH_INTO);
        for (int r = 0; r < R; r++) {
            const __m512 a = widen16(rows + r * K + k);
            for (int m = 0; m < MR; m++) acc[m][r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), a, acc[m][r]);
        }
    }
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) {
            const int8_t *row = rows + r * K;
            float s = _mm512_reduce_add_ps(acc[m][r]);
            for (k = K16; k < K; k++) s += x[m * K + k] * (float)row[k];
            y[m * w->N + n + r] = s * w->scale[n + r];
        }
}
FEW_ROWS(int8_tile8_512, 5, 2) FEW_ROWS(int8_tile8_512, 6, 2)
FEW_ROWS(int8_tile8_512, 7, 2) FEW_ROWS(int8_tile8_512, 8, 2)

#define FEW_ROWS_512_MAX 8 /* rows of x an AVX-512 int8 tile takes */
static const few_rows_fn INT8_FEW_ROWS_512_BY_M[FEW_ROWS_512_MAX + 1] = {
    NULL, int8_tile_512_few_rows_1, int8_tile_512_few_rows_2, int8_tile_512_few_rows_3, int8_tile_512_few_rows_4,
    int8_tile8_512_few_rows_5, int8_tile8_512_few_rows_6, int8_tile8_512_few_rows_7, int8_tile8_512_few_rows_8};
static const few_rows_fn INT4_FEW_ROWS_512_BY_M[FEW_ROWS_MAX + 1] = {
    NULL, int4_tile_512_few_rows_1, int4_tile_512_few_rows_2, int4_tile_512_few_rows_3, int4_tile_512_few_rows_4};

#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")

/* Many rows: y[m, n + r] for m < MR, r < R from weight rows already widened into
 * wide (R, K), times scale[n + r] where a row scale is given (int8), else not (int4). */
#define TILE_M 3 /* rows of x and */
#define TILE_N 4 /* widened weight rows per tile: TILE_M x TILE_N accumulators */

INLINE void widened_tile(const float *x, const int MR, const int R, int64_t K, const float *wide,
                         const float *scale, float *y, int64_t ldy, int64_t n) {
    __m256 acc[TILE_M][TILE_N];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
    const int64_t K8 = K & ~(int64_t)7;
    for (int64_t k = 0; k < K8; k += 8) {
        __m256 wv[TILE_N];
        for (int r = 0; r < R; r++) wv[r] = _mm256_loadu_ps(wide + r * K + k);
        for (int m = 0; m < MR; m++) {
            __m256 xv = _mm256_loadu_ps(x + m * K + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
        }
    }
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) {
            float s = hsum(acc[m][r]);
            for (int64_t k = K8; k < K; k++) s += x[m * K + k] * wide[r * K + k];
            y[m * ldy + n + r] = scale == NULL ? s : s * scale[n + r];
        }
}

/* Weight rows n .. n + R - 1 as fp32 into wide (R, K): int8 codes as they are (the
 * row scale comes after the product), int4 dequantised, (q - zero) * scale. */
static void dequantize_rows(const QWeights *w, int64_t n, int R, float *wide) {
    const int64_t K = w->K;
    if (w->bits == 8) {
        const int8_t *codes = (const int8_t *)w->codes + n * K;
        const int64_t count = R * K, count16 = count & ~(int64_t)15;
        for (int64_t i = 0; i < count16; i += 16) {
            _mm256_storeu_ps(wide + i, widen8(codes + i));
            _mm256_storeu_ps(wide + i + 8, widen8(codes + i + 8));
        }
        for (int64_t i = count16; i < count; i++) wide[i] = (float)codes[i];
        return;
    }
    const int64_t G = K / w->group;
    for (int r = 0; r < R; r++) {
        const uint8_t *row = (const uint8_t *)w->codes + (n + r) * (K / 2);
        for (int64_t k = 0; k < K; k += 32) {
            const int64_t g = (n + r) * G + k / w->group;
            const __m256 s = _mm256_set1_ps(w->scale[g]);
            __m256 v[4];
            int4_widen32(row + k / 2, _mm256_set1_epi32(w->zero[g]), v);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(wide + r * K + k + 8 * i, _mm256_mul_ps(v[i], s));
        }
    }
}

#define ROW_BLOCK 48 /* rows of x per pass over a thread's weights: ROW_BLOCK x K floats stay in L2 */

static void many_rows(const float *x, int64_t M, const QWeights *w, float *y, int64_t n0, int64_t n1, float *wide) {
    const int64_t K = w->K, N = w->N;
    const float *row_scale = w->bits == 8 ? w->scale : NULL;
    for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
        const int64_t m1 = m0 + ROW_BLOCK < M ? m0 + ROW_BLOCK : M;
        for (int64_t n = n0; n < n1; n += TILE_N) {
            const int R = n1 - n < TILE_N ? (int)(n1 - n) : TILE_N;
            dequantize_rows(w, n, R, wide);
            int64_t m = m0;
            if (R == TILE_N) {
                for (; m + TILE_M <= m1; m += TILE_M)
                    widened_tile(x + m * K, TILE_M, TILE_N, K, wide, row_scale, y + m * N, N, n);
                for (; m < m1; m++) widened_tile(x + m * K, 1, TILE_N, K, wide, row_scale, y + m * N, N, n);
            } else {
                for (; m < m1; m++)
                    for (int r = 0; r < R; r++)
                        widened_tile(x + m * K, 1, 1, K, wide + r * K, row_scale, y + m * N, N, n + r);
            }
        }
    }
}

#define CHUNK 32 /* output rows per unit of parallel work */

/* Up to how many rows each chunk runs the few-rows tiles on 4 rows of x at a time, its codes
 * still in cache on the next pass (past them, the buffered path). At 6-16 rows this took 0.8-1.3x
 * the time of fbgemm's fp16 product, the buffered path 1.1-1.6x (2752 x 512 and 512 x 1376,
 * AVX2, 2026-11-30). Up to 63 rows (all that reach this kernel, compress/kernels.py) the tiles
 * beat the buffered path on the Zen 4 host (32 copies of a `small` layer's products, two threads,
 * in-process A/B, 2026-12-03): the AVX-512 tiles 1.12-1.31x as fast for int8 and 1.19-1.32x for
 * int4 at 17-63 rows; the AVX2 tiles 1.0-1.31x for int8, but 0.59-0.74x for int4. */
static int64_t widen_in_registers_max(int bits) { return AVX512_HERE || bits == 8 ? 63 : 16; }

/* y (M, N) = x (M, K) @ Ŵᵀ; nonzero when a thread's buffer could not be allocated. */
static int quantized_mm(const float *x, int64_t M, const QWeights *w, float *y, int threads) {
    const int64_t chunks = (w->N + CHUNK - 1) / CHUNK;
    int failed = 0;
    if (M <= widen_in_registers_max(w->bits)) {
        const few_rows_fn *table = w->bits == 8 ? (AVX512_HERE ? INT8_FEW_ROWS_512_BY_M : INT8_FEW_ROWS_BY_M)
                                                : (AVX512_HERE ? INT4_FEW_ROWS_512_BY_M : INT4_FEW_ROWS_BY_M);
        const int64_t most = table == INT8_FEW_ROWS_512_BY_M ? FEW_ROWS_512_MAX : FEW_ROWS_MAX; /* rows a tile */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t n0 = c * CHUNK, n1 = n0 + CHUNK < w->N ? n0 + CHUNK : w->N;
            for (int64_t m = 0; m < M; m += most) {
                const int64_t rows = M - m < most ? M - m : most;
                table[rows](x + m * w->K, w, y + m * w->N, n0, n1);
            }
        }
        return 0;
    }
#pragma omp parallel num_threads(threads)
    {
        float *wide = malloc(sizeof(float) * TILE_N * (w->K > 0 ? w->K : 1)); /* malloc(0) may be NULL */
        if (wide == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            if (wide == NULL) continue;
            const int64_t n0 = c * CHUNK, n1 = n0 + CHUNK < w->N ? n0 + CHUNK : w->N;
            many_rows(x, M, w, y, n0, n1, wide);
        }
        free(wide);
    }
    return failed;
}

/* out (n1 - n0, K) = Ŵ's rows n0 .. n1 - 1 in fp32, as the schemes' reference dequantises them
 * (int8 codes * scale, int4 (q - zero) * scale: the same fp32 numbers), rows shared among threads. */
static void dequantize(const QWeights *w, int64_t n0, int64_t n1, float *out, int threads) {
    const int64_t K = w->K, G = w->bits == 4 ? K / w->group : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        float *row = out + (n - n0) * K;
        if (w->bits == 8) {
            const int8_t *codes = (const int8_t *)w->codes + n * K;
            const __m256 s = _mm256_set1_ps(w->scale[n]);
            int64_t k = 0;
            for (; k + 8 <= K; k += 8) _mm256_storeu_ps(row + k, _mm256_mul_ps(widen8(codes + k), s));
            for (; k < K; k++) row[k] = (float)codes[k] * w->scale[n];
            continue;
        }
        const uint8_t *packed = (const uint8_t *)w->codes + n * (K / 2);
        for (int64_t k = 0; k < K; k += 32) {
            const int64_t g = n * G + k / w->group;
            const __m256 s = _mm256_set1_ps(w->scale[g]);
            __m256 v[4];
            int4_widen32(packed + k / 2, _mm256_set1_epi32(w->zero[g]), v);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(row + k + 8 * i, _mm256_mul_ps(v[i], s));
        }
    }
}

#pragma GCC pop_options

/* -1 with a ValueError that names `signature` unless `w` is a layout the kernel takes. */
static int check_weights(const QWeights *w, const char *signature) {
    if (w->N < 0 || w->K < 0 || (w->bits != 8 && w->bits != 4) ||
        (w->bits == 4 && (w->zero == NULL || w->group < 32 || w->group % 32 || w->K % w->group))) {
        PyErr_Format(PyExc_ValueError, "%s: N and K must be >= 0, bits 8 or 4; int4 needs zero points and a group "
                                       "of a multiple of 32 dividing K", signature);
        return -1;
    }
    return 0;
}

#define MM_SIGNATURE "mm(x_ptr, M, y_ptr, threads, bits, codes_ptr, scale_ptr, zero_ptr, N, K, group)"

static PyObject *py_mm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[11];
    if (unpack(args, nargs, 11, 11, MM_SIGNATURE, v)) return NULL;
    const float *x = (const float *)(intptr_t)v[0];
    const int64_t M = v[1];
    float *y = (float *)(intptr_t)v[2];
    const int threads = (int)v[3];
    QWeights w = {
        .bits = (int)v[4],
        .codes = (const void *)(intptr_t)v[5],
        .scale = (const float *)(intptr_t)v[6],
        .zero = (const int32_t *)(intptr_t)v[7],
        .N = v[8],
        .K = v[9],
        .group = v[10],
    };
    if (check_weights(&w, MM_SIGNATURE)) return NULL;
    if (M < 0 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, MM_SIGNATURE ": M must be >= 0 and threads >= 1");
        return NULL;
    }
    int failed = 0;
    if (M > 0 && w.N > 0) {
        Py_BEGIN_ALLOW_THREADS
        failed = quantized_mm(x, M, &w, y, threads);
        Py_END_ALLOW_THREADS
    }
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---- The same product offered to the core's whole-layer decoding kernel (core/csrc/product.h) ---- */

typedef struct {
    HeronProduct base;        /* first: the core reads the product through it */
    QWeights w;
    const float *input_scale; /* (K,) multiplies x first (AWQ); NULL: none */
    PyObject *keep;           /* holds the memory the addresses above point into */
} FusedProduct;

static int fused_run(const HeronProduct *self, const float *x, int64_t M, float *y, int threads) {
    const FusedProduct *p = (const FusedProduct *)self;
    if (p->input_scale == NULL) return quantized_mm(x, M, &p->w, y, threads);
    const int64_t K = p->w.K;
    float *scaled = malloc(sizeof(float) * (size_t)(M * K > 0 ? M * K : 1));
    if (scaled == NULL) return 1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) scaled[m * K + k] = x[m * K + k] * p->input_scale[k];
    const int failed = quantized_mm(scaled, M, &p->w, y, threads);
    free(scaled);
    return failed;
}

static void fused_product_free(PyObject *capsule) {
    FusedProduct *p = PyCapsule_GetPointer(capsule, HERON_PRODUCT_CAPSULE);
    if (p == NULL) return;
    Py_XDECREF(p->keep);
    free(p);
}

#define PRODUCT_SIGNATURE \
    "product(keep, bits, codes_ptr, scale_ptr, zero_ptr, input_scale_ptr, N, K, group)"

static PyObject *py_product(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[8];
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, PRODUCT_SIGNATURE);
        return NULL;
    }
    if (ints(args + 1, 8, v)) return NULL;
    const QWeights w = {
        .bits = (int)v[0], .codes = (const void *)(intptr_t)v[1], .scale = (const float *)(intptr_t)v[2],
        .zero = (const int32_t *)(intptr_t)v[3], .N = v[5], .K = v[6], .group = v[7],
    };
    if (check_weights(&w, PRODUCT_SIGNATURE)) return NULL;
    if (w.N < 1 || w.K < 1) {
        PyErr_SetString(PyExc_ValueError, PRODUCT_SIGNATURE ": N and K must be >= 1");
        return NULL;
    }
    FusedProduct *p = malloc(sizeof(FusedProduct));
    if (p == NULL) return PyErr_NoMemory();
    *p = (FusedProduct){.base = {.run = fused_run, .N = w.N, .K = w.K}, .w = w,
                        .input_scale = (const float *)(intptr_t)v[4], .keep = args[0]};
    PyObject *capsule = PyCapsule_New(p, HERON_PRODUCT_CAPSULE, fused_product_free);
    if (capsule == NULL) {
        free(p);
        return NULL;
    }
    Py_INCREF(args[0]);
    return capsule;
}

#define DEQUANTIZE_SIGNATURE \
    "dequantize(bits, codes_ptr, scale_ptr, zero_ptr, N, K, group, n0, n1, out_ptr, threads)"

static PyObject *py_dequantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[11];
    if (unpack(args, nargs, 11, 11, DEQUANTIZE_SIGNATURE, v)) return NULL;
    const QWeights w = {
        .bits = (int)v[0], .codes = (const void *)(intptr_t)v[1], .scale = (const float *)(intptr_t)v[2],
        .zero = (const int32_t *)(intptr_t)v[3], .N = v[4], .K = v[5], .group = v[6],
    };
    const int64_t n0 = v[7], n1 = v[8];
    const int threads = (int)v[10];
    if (check_weights(&w, DEQUANTIZE_SIGNATURE)) return NULL;
    if (n0 < 0 || n1 < n0 || n1 > w.N || threads < 1) {
        PyErr_SetString(PyExc_ValueError, DEQUANTIZE_SIGNATURE ": needs 0 <= n0 <= n1 <= N and threads >= 1");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    dequantize(&w, n0, n1, (float *)(intptr_t)v[9], threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Whether the few-rows products run the AVX-512 tiles; `enable` True or False turns them on or off,
 * each only where the CPU runs them. */
static PyObject *py_avx512(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int enable;
    const int given = avx512_switch(args, nargs, &enable);
    if (given < 0) return NULL;
    if (given) AVX512_HERE = enable;
    return PyBool_FromLong(AVX512_HERE);
}

static PyMethodDef METHODS[] = {
    {"dequantize", (PyCFunction)(void (*)(void))py_dequantize, METH_FASTCALL,
     DEQUANTIZE_SIGNATURE ": Ŵ's rows n0 .. n1 - 1 as fp32 into out (n1 - n0, K), contiguous, as the schemes "
     "dequantise them; the weights as `mm` takes them."},
    {"avx512", (PyCFunction)(void (*)(void))py_avx512, METH_FASTCALL,
     AVX512_SIGNATURE ": whether few-row products run the AVX-512 tiles (on where the CPU has AVX-512F); "
     "True or False turns them on or off, True only where the CPU runs them."},
    {"mm", (PyCFunction)(void (*)(void))py_mm, METH_FASTCALL,
     MM_SIGNATURE ": y = x @ Ŵᵀ for int8 (bits 8, codes (N, K), scale (N,), zero 0) or int4 (bits 4, "
     "codes packed (N, K/2) in blocks of 32, scale and int32 zero (N, K/group)); x and y contiguous fp32. The "
     "caller checks shapes and dtypes, and that the CPU has AVX2 and FMA."},
    {"product", (PyCFunction)(void (*)(void))py_product, METH_FASTCALL,
     PRODUCT_SIGNATURE ": mm's product, times a per-input scale first where input_scale_ptr is not 0, as a "
     "capsule the core's whole-layer decoding kernel calls (core/csrc/product.h); it holds `keep`, which must "
     "hold the memory the addresses point into."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, .m_name = "_fused", .m_size = -1, .m_methods = METHODS,
};

PyMODINIT_FUNC PyInit__fused(void) {
    __builtin_cpu_init();
    AVX512_HERE = __builtin_cpu_supports("avx512f");
    return PyModule_Create(&MODULE);
}
