/* Heron's fused dequantise-and-multiply for int8 weight-only linears on x86 CPUs
 * with AVX2 and FMA: y = x @ (scale * W)ᵀ with W int8 codes (N, K) row-major,
 * scale (N,) fp32, x (M, K) fp32, y (M, N) fp32; accumulation in fp32.
 *
 * Why: PyTorch ships no vectorised weight-only int8 product for AVX2 CPUs (its
 * `_weight_int8pack_mm` is a scalar loop there), and the fp16-weight GEMM it
 * does ship reads two bytes a weight. Decoding is a stream of weights, so
 * reading one byte a weight and widening it in registers is what makes int8
 * decode faster than fp32 and than quantize_dynamic, which rounds activations.
 *
 * Two paths, both parallel over output rows with OpenMP (the runtime torch
 * already loaded, so both share one thread pool):
 *   - few rows (M <= 4, decoding): each 16 codes are widened to fp32 in
 *     registers and multiplied into every row of x: one pass over the weights.
 *   - many rows (prefill): 4 weight rows at a time are widened once into a
 *     per-thread fp32 buffer and multiplied into blocks of 3 rows of x, a
 *     12-accumulator tile. At 64 and 512 rows this took 1.2-1.4x the time of
 *     fbgemm's fp16-weight GEMM (about fp32's time); a k-major 6 x 16 panel
 *     kernel was 2.4-3.4x, its transposing widen costing as much as its FMAs.
 * The kernel functions carry their own target attribute, so importing the
 * module on a CPU without AVX2 is safe; callers check the CPU first. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

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
INLINE void codes_step(const float *x, const int MR, const int R, int64_t K, const int8_t *codes,
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

INLINE void codes_tile(const float *x, const int MR, const int R, int64_t K, const int8_t *w,
                       const float *scale, float *y, int64_t ldy, int64_t n) {
    __m256 lo[4][4], hi[4][4];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) lo[m][r] = hi[m][r] = _mm256_setzero_ps();
    const int8_t *rows = w + n * K;
    const int64_t K64 = K & ~(int64_t)63, K16 = K & ~(int64_t)15;
    int64_t k = 0;
    for (; k < K64; k += 64) {  /* a cache line of each row per pass, and one prefetch of each */
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(rows + r * K + k + PREFETCH_AHEAD), _MM_HINT_T0);
        for (int j = 0; j < 64; j += 16) codes_step(x + k + j, MR, R, K, rows + k + j, lo, hi);
    }
    for (; k < K16; k += 16) codes_step(x + k, MR, R, K, rows + k, lo, hi);
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < R; r++) {
            const int8_t *row = rows + r * K;
            float s = hsum(_mm256_add_ps(lo[m][r], hi[m][r]));
            for (k = K16; k < K; k++) s += x[m * K + k] * (float)row[k];
            y[m * ldy + n + r] = s * scale[n + r];
        }
}

#define FEW_ROWS(MR, R)                                                                                  \
    static void few_rows_##MR(const float *x, int64_t K, const int8_t *w, const float *scale, float *y,  \
                              int64_t ldy, int64_t n0, int64_t n1) {                                     \
        int64_t n = n0;                                                                                  \
        for (; n + R <= n1; n += R) codes_tile(x, MR, R, K, w, scale, y, ldy, n);                        \
        for (; n < n1; n++) codes_tile(x, MR, 1, K, w, scale, y, ldy, n);                                \
    }
FEW_ROWS(1, 4) /* 2 x MR x R accumulators: at most 12 of the 16 vector registers */
FEW_ROWS(2, 3)
FEW_ROWS(3, 2)
FEW_ROWS(4, 1)
typedef void (*few_rows_fn)(const float *, int64_t, const int8_t *, const float *, float *, int64_t, int64_t, int64_t);
static const few_rows_fn FEW_ROWS_BY_M[5] = {NULL, few_rows_1, few_rows_2, few_rows_3, few_rows_4};

/* Many rows: y[m, n + r] for m < MR, r < R from weight rows already widened into wide (R, K). */
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
            y[m * ldy + n + r] = s * scale[n + r];
        }
}

static void widen_rows(const int8_t *w, int64_t rows, int64_t K, float *wide) {
    const int64_t count = rows * K, count16 = count & ~(int64_t)15;
    for (int64_t i = 0; i < count16; i += 16) {
        _mm256_storeu_ps(wide + i, widen8(w + i));
        _mm256_storeu_ps(wide + i + 8, widen8(w + i + 8));
    }
    for (int64_t i = count16; i < count; i++) wide[i] = (float)w[i];
}

#define ROW_BLOCK 48 /* rows of x per pass over a thread's weights: ROW_BLOCK x K floats stay in L2 */

static void many_rows(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scale, float *y,
                      int64_t N, int64_t n0, int64_t n1, float *wide) {
    for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
        const int64_t m1 = m0 + ROW_BLOCK < M ? m0 + ROW_BLOCK : M;
        for (int64_t n = n0; n < n1; n += TILE_N) {
            const int R = n1 - n < TILE_N ? (int)(n1 - n) : TILE_N;
            widen_rows(w + n * K, R, K, wide);
            int64_t m = m0;
            if (R == TILE_N) {
                for (; m + TILE_M <= m1; m += TILE_M) widened_tile(x + m * K, TILE_M, TILE_N, K, wide, scale, y + m * N, N, n);
                for (; m < m1; m++) widened_tile(x + m * K, 1, TILE_N, K, wide, scale, y + m * N, N, n);
            } else {
                for (; m < m1; m++)
                    for (int r = 0; r < R; r++) widened_tile(x + m * K, 1, 1, K, wide + r * K, scale, y + m * N, N, n + r);
            }
        }
    }
}

#define FEW_ROWS_MAX 4
#define CHUNK 32 /* output rows per unit of parallel work */

static int int8_mm(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scale, int64_t N,
                   float *y, int threads) {
    const int64_t chunks = (N + CHUNK - 1) / CHUNK;
    int failed = 0;
    if (M <= FEW_ROWS_MAX) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t n0 = c * CHUNK, n1 = n0 + CHUNK < N ? n0 + CHUNK : N;
            FEW_ROWS_BY_M[M](x, K, w, scale, y, N, n0, n1);
        }
        return 0;
    }
#pragma omp parallel num_threads(threads)
    {
        float *wide = malloc(TILE_N * K * sizeof(float));
        if (wide == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            if (wide == NULL) continue;
            const int64_t n0 = c * CHUNK, n1 = n0 + CHUNK < N ? n0 + CHUNK : N;
            many_rows(x, M, K, w, scale, y, N, n0, n1, wide);
        }
        free(wide);
    }
    return failed;
}

#pragma GCC pop_options

static PyObject *py_int8_mm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "int8_mm(x_ptr, M, K, codes_ptr, scale_ptr, N, y_ptr, threads)");
        return NULL;
    }
    const float *x = PyLong_AsVoidPtr(args[0]);
    const int64_t M = PyLong_AsLongLong(args[1]), K = PyLong_AsLongLong(args[2]);
    const int8_t *w = PyLong_AsVoidPtr(args[3]);
    const float *scale = PyLong_AsVoidPtr(args[4]);
    const int64_t N = PyLong_AsLongLong(args[5]);
    float *y = PyLong_AsVoidPtr(args[6]);
    const int threads = (int)PyLong_AsLong(args[7]);
    if (PyErr_Occurred()) return NULL;
    if (M < 0 || K < 0 || N < 0 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "int8_mm: M, K and N must be >= 0 and threads >= 1");
        return NULL;
    }
    int failed = 0;
    if (M > 0 && N > 0) {
        Py_BEGIN_ALLOW_THREADS
        failed = int8_mm(x, M, K, w, scale, N, y, threads);
        Py_END_ALLOW_THREADS
    }
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef METHODS[] = {
    {"int8_mm", (PyCFunction)(void (*)(void))py_int8_mm, METH_FASTCALL,
     "int8_mm(x_ptr, M, K, codes_ptr, scale_ptr, N, y_ptr, threads): y = x @ (scale * codes)^T, all contiguous "
     "fp32 except the int8 codes; the caller checks shapes, dtypes and that the CPU has AVX2 and FMA."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, .m_name = "_int8mm", .m_size = -1, .m_methods = METHODS,
};

PyMODINIT_FUNC PyInit__int8mm(void) { return PyModule_Create(&MODULE); }
