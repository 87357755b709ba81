/* Heron's few-row fp32 product for decoding: y (M, N) = x (M, K) @ Wᵀ for M <= 64
 * rows and a weight W (N, K) laid out input-major, i.e. Wt = Wᵀ (K, N) row-major
 * in memory, as core/linear.py's `set_decode_layout` lays weights out to decode.
 *
 * Why: a decoding step reads every weight once, so its speed is the speed at
 * which the products stream weights from memory. torch's kernels for one or two
 * rows (MKL's small-M GEMM behind bmm and F.linear) read ~21 GB/s on one core
 * of the Zen 5 host, where a plain `sum` reads ~36; the blocked bmm of
 * core/linear.py reached 34-37 GB/s on two threads at the `base` preset's
 * layer shapes. Here each thread takes a contiguous block of Wt's K rows, which it
 * reads from memory with software prefetch, adding x[m, k] * Wt[k, :] for four
 * rows k a pass (adjacent ones, or for narrow weights one from each quarter of
 * the block: stream_mm.h) into a partial y of its own, which stays in cache;
 * the threads' partials are summed at the end. Two threads streamed
 * those shapes at 44-47 GB/s (AVX-512) and 40-42 (AVX2), and decoding steps
 * ran 1.15x (`base`), 1.20x (`small`) and 1.14x (`tiny`) as fast (2026-12-02).
 * With more rows each pass over four weight rows (from cache) serves every row
 * of x: at 4 and 8 rows the layers' weights streamed at 30-31 and 24-27 GB/s
 * against 20-21 and 16-17 for the blocks over row-major weights; at 16 rows
 * the passes' partial sums of the head (16 x 32,000) outgrew the cache and the
 * two tied. From 6 rows on, register tiles of the partial sums take over
 * (stream_mm.h: 8-row decoding steps 1.17x as fast on the Zen 4 host), and
 * past 8 rows tiles of up to 8 rows share each block of weights from cache:
 * batches of 9, 12 and 16 rows decoded the `small` checkpoint of
 * bench_compress 1.70x, 1.55x and 1.52x as fast as through the blocked bmm
 * (and the layers in parts) before (Zen 4, 2026-12-03, 8 alternating rounds
 * of 48 steps, the same greedy tokens), and up to 63 rows faster than the
 * GEMM (core/linear.py, STREAM_ROWS).
 *
 * One body, compiled for AVX-512F and for AVX2 with FMA through GCC's vector
 * extensions; the module picks one when it loads (`supported()` says whether
 * either runs here). Threads come from the OpenMP runtime torch already
 * loaded, as in compress/csrc/fused.c. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "fastcall_args.h"
#include "stream_mm.h"

static rows_into_fn ROWS_INTO_HERE;

#define MM_SIGNATURE "mm(x_ptr, M, y_ptr, threads, wt_ptr, N, K)"

static PyObject *py_mm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[7];
    if (unpack(args, nargs, 7, 7, MM_SIGNATURE, v)) return NULL;
    const float *x = (const float *)(intptr_t)v[0], *wt = (const float *)(intptr_t)v[4];
    float *y = (float *)(intptr_t)v[2];
    const int64_t M = v[1], N = v[5], K = v[6];
    const int threads = (int)v[3];
    if (ROWS_INTO_HERE == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "mm: this CPU has neither AVX-512F nor AVX2 with FMA");
        return NULL;
    }
    if (M < 1 || M > MAX_ROWS || N < 1 || K < 1 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, MM_SIGNATURE ": M must be 1 to 64, N and K at least 1, threads at least 1");
        return NULL;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = stream_mm(ROWS_INTO_HERE, x, M, wt, N, K, y, threads);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_supported(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(ROWS_INTO_HERE != NULL);
}

/* Whether `mm` runs the AVX-512 body; `enable` True or False switches to it or to the AVX2 one, each
 * only where the CPU runs it. */
static PyObject *py_avx512(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int enable;
    const int given = avx512_switch(args, nargs, &enable);
    if (given < 0) return NULL;
    if (given) ROWS_INTO_HERE = enable ? rows_into_avx512 : rows_into_avx2;
    return PyBool_FromLong(ROWS_INTO_HERE == rows_into_avx512);
}

static PyMethodDef METHODS[] = {
    {"avx512", (PyCFunction)(void (*)(void))py_avx512, METH_FASTCALL,
     AVX512_SIGNATURE ": whether `mm` runs its AVX-512 body (where the CPU has AVX-512F); True or False "
     "switches to it or to the AVX2 one, each only where the CPU runs it."},
    {"mm", (PyCFunction)(void (*)(void))py_mm, METH_FASTCALL,
     MM_SIGNATURE ": y (M, N) = x (M, K) @ Wt (K, N) for M of 1 to 64, all contiguous fp32 on the CPU; the "
     "caller checks shapes, dtypes and `supported()`."},
    {"supported", py_supported, METH_NOARGS, "supported(): whether this CPU runs `mm` (AVX-512F, or AVX2 with FMA)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, .m_name = "_stream", .m_size = -1, .m_methods = METHODS,
};

PyMODINIT_FUNC PyInit__stream(void) {
    ROWS_INTO_HERE = pick();
    return PyModule_Create(&MODULE);
}
