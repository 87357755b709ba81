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
 *   - few rows (decoding, M <= 16): codes are widened to fp32 in registers
 *     and multiplied into up to 4 rows of x at a time: one pass over the
 *     weights from memory, one byte (int8) or half a byte (int4) a weight.
 *   - many rows (prefill): 4 weight rows at a time are dequantised once into a
 *     per-thread fp32 buffer and multiplied into blocks of 3 rows of x, a
 *     12-accumulator tile. At 64 and 512 rows this took 1.2-1.9x the time of
 *     fbgemm's fp16-weight GEMM (about fp32's time). The usual 6 x 16 GEMM
 *     micro-kernel on k-major panels was slower (2026-11-30): 2.4-3.4x with
 *     16 rows widened into a transposed buffer, 2.5x with the codes repacked
 *     k-major in panels of 16 rows and widened on the fly.
 * The kernel functions carry their own target attribute, so importing the
 * module on a CPU without AVX2 is safe; callers check the CPU first. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "../../core/csrc/fastcall_args.h"

/* A quantised weight matrix (N, K): see the top of the file for each layout. */
typedef struct {
    int bits;            /* 8 or 4 */
    const void *codes;   /* int8 (N, K), or int4 packed (N, K / 2) */
    const float *scale;  /* int8 (N,), int4 (N, K / group) */
    const int32_t *zero; /* int4 (N, K / group); NULL for int8 */
    int64_t N, K, group; /* group: int4 only, a multiple of 32 */
} QWeights;

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
 * requested: with hardware prefetch alone two threads streamed 11-14 GB/s of
 * codes from memory here, with this 15-19 GB/s (AMD EPYC, 2026-11-30). */
#define PREFETCH_AHEAD 4096

INLINE void int8_codes_tile(const float *x, const int MR, const int R, int64_t K, const int8_t *w,
                       const float *scale, float *y, int64_t ldy, int64_t n) {
    __m256 lo[4][4], hi[4][4];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) lo[m][r] = hi[m][r] = _mm256_setzero_ps();
    const int8_t *rows = w + n * K;
    const int64_t K64 = K & ~(int64_t)63, K16 = K & ~(int64_t)15;
    int64_t k = 0;
    for (; k < K64; k += 64) {  /* a cache line of each row per pass, and one prefetch of each */
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(rows + r * K + k + PREFETCH_AHEAD), _MM_HINT_T0);
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
                if ((k & 127) == 0) _mm_prefetch((const char *)(block + PREFETCH_AHEAD), _MM_HINT_T0);
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

/* Up to this many rows, each chunk runs the few-rows tiles on 4 rows of x at a
 * time, its codes still in cache on the second pass; at 6-16 rows this took
 * 0.8-1.3x the time of fbgemm's fp16 product, the buffered path 1.1-1.6x
 * (2752 x 512 and 512 x 1376, 2026-11-30). */
#define WIDEN_IN_REGISTERS_MAX 16

/* y (M, N) = x (M, K) @ Ŵᵀ; nonzero when a thread's buffer could not be allocated. */
static int quantized_mm(const float *x, int64_t M, const QWeights *w, float *y, int threads) {
    const int64_t chunks = (w->N + CHUNK - 1) / CHUNK;
    int failed = 0;
    if (M <= WIDEN_IN_REGISTERS_MAX) {
        const few_rows_fn *table = w->bits == 8 ? INT8_FEW_ROWS_BY_M : INT4_FEW_ROWS_BY_M;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t n0 = c * CHUNK, n1 = n0 + CHUNK < w->N ? n0 + CHUNK : w->N;
            for (int64_t m = 0; m < M; m += FEW_ROWS_MAX) {
                const int64_t rows = M - m < FEW_ROWS_MAX ? M - m : FEW_ROWS_MAX;
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

#pragma GCC pop_options

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
    if (M < 0 || w.N < 0 || w.K < 0 || threads < 1 || (w.bits != 8 && w.bits != 4) ||
        (w.bits == 4 && (w.zero == NULL || w.group < 32 || w.group % 32 || w.K % w.group))) {
        PyErr_SetString(PyExc_ValueError, MM_SIGNATURE ": M, N and K must be >= 0, threads >= 1, bits 8 or 4; "
                                          "int4 needs zero points and a group of a multiple of 32 dividing K");
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

static PyMethodDef METHODS[] = {
    {"mm", (PyCFunction)(void (*)(void))py_mm, METH_FASTCALL,
     MM_SIGNATURE ": y = x @ Ŵᵀ for int8 (bits 8, codes (N, K), scale (N,), zero 0) or int4 (bits 4, "
     "codes packed (N, K/2) in blocks of 32, scale and int32 zero (N, K/group)); x and y contiguous fp32. The "
     "caller checks shapes and dtypes, and that the CPU has AVX2 and FMA."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, .m_name = "_fused", .m_size = -1, .m_methods = METHODS,
};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&MODULE); }
