/* SwiGLU's activation, silu(gate) * up, and its gradient, in one pass over memory each, for
 * training and prefill (core/swiglu.py calls them).
 *
 * Why: torch computes silu(gate) * up in two kernels and its gradient in four or five (silu's
 * gradient, two products, and, where gate and up are halves of one tensor, a `cat` of their
 * gradients), each reading and writing the whole hidden activation; torch's autograd also keeps
 * silu(gate) for the backward. Here the forward reads gate and up and writes the output once,
 * the backward reads them and the output's gradient and writes both gradients once, and only
 * the input is kept. For tiny-moe's experts (6,144 rows of 2 x 192; Zen 4, one thread,
 * 2026-12-03) forward and backward took 5.3-5.8 ms against torch's 10.0; a whole `small`
 * training step ran ~1% faster, its peak memory 6% lower (benchmarks/NOTES.md, Training).
 *
 * Numbers: fp32, torch's formulas (silu(x) = x / (1 + e^-x); silu'(x) = s (1 + x (1 - s))) with
 * vector_math.h's exponential, within a few ulp of torch's. Rows are shared out among threads
 * (OpenMP, the runtime torch loaded) past PARALLEL_ELEMENTS. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <omp.h>
#include <stdint.h>

#include "fastcall_args.h"
#include "vector_math.h"

#define PARALLEL_ELEMENTS 32768 /* rows x ff below which one thread does it all */

/* The rows [first, first + count) that thread `t` of `team` takes of `rows`. */
static void share(int64_t rows, int team, int t, int64_t *first, int64_t *count) {
    const int64_t base = rows / team, extra = rows % team;
    *first = t * base + (t < extra ? t : extra);
    *count = base + (t < extra);
}

static int team_for(int64_t rows, int64_t ff, int threads) {
    if (rows * ff < PARALLEL_ELEMENTS || threads < 2) return 1;
    return rows < threads ? (int)rows : threads;
}

/* One call's arguments: out is written forward, grad_gate and grad_up (at grad_stride) backward, from grad. */
typedef struct {
    const float *gate, *up, *grad;
    float *out, *grad_gate, *grad_up;
    int64_t stride, rows, ff, grad_stride;
} Call;

/* The forward (out) or the backward (grad_gate, grad_up) over all rows, shared out among threads. */
static void run(const Call *c, int backward, int threads) {
    const int team = team_for(c->rows, c->ff, threads);
#pragma omp parallel num_threads(team) if (team > 1)
    {
        int64_t first, count;
        share(c->rows, team, omp_get_thread_num(), &first, &count);
        const float *gate = c->gate + first * c->stride, *up = c->up + first * c->stride;
        if (backward)
            swiglu_grad_rows(gate, up, c->stride, c->grad + first * c->ff, count, c->ff,
                             c->grad_gate + first * c->grad_stride, c->grad_up + first * c->grad_stride, c->grad_stride);
        else
            swiglu_rows(gate, up, c->stride, count, c->ff, c->out + first * c->ff);
    }
}

#define FORWARD_SIGNATURE "swiglu(gate_ptr, up_ptr, stride, rows, ff, out_ptr, threads)"

static PyObject *py_swiglu(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[7];
    if (unpack(args, nargs, 7, 7, FORWARD_SIGNATURE, v)) return NULL;
    const Call c = {.gate = (const float *)(intptr_t)v[0], .up = (const float *)(intptr_t)v[1], .stride = v[2],
                    .rows = v[3], .ff = v[4], .out = (float *)(intptr_t)v[5]};
    if (c.rows < 1 || c.ff < 1 || c.stride < c.ff || v[6] < 1) {
        PyErr_SetString(PyExc_ValueError, FORWARD_SIGNATURE ": rows, ff and threads at least 1, stride at least ff");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    run(&c, 0, (int)v[6]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#define BACKWARD_SIGNATURE \
    "swiglu_backward(gate_ptr, up_ptr, stride, grad_ptr, rows, ff, grad_gate_ptr, grad_up_ptr, grad_stride, threads)"

static PyObject *py_swiglu_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[10];
    if (unpack(args, nargs, 10, 10, BACKWARD_SIGNATURE, v)) return NULL;
    const Call c = {.gate = (const float *)(intptr_t)v[0], .up = (const float *)(intptr_t)v[1], .stride = v[2],
                    .grad = (const float *)(intptr_t)v[3], .rows = v[4], .ff = v[5],
                    .grad_gate = (float *)(intptr_t)v[6], .grad_up = (float *)(intptr_t)v[7], .grad_stride = v[8]};
    if (c.rows < 1 || c.ff < 1 || c.stride < c.ff || c.grad_stride < c.ff || v[9] < 1) {
        PyErr_SetString(PyExc_ValueError,
                        BACKWARD_SIGNATURE ": rows, ff and threads at least 1, both strides at least ff");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    run(&c, 1, (int)v[9]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef METHODS[] = {
    {"swiglu", (PyCFunction)(void (*)(void))py_swiglu, METH_FASTCALL,
     FORWARD_SIGNATURE ": out (rows, ff), contiguous, = silu(gate) * up, row r of gate and up `stride` floats "
                       "after row r - 1; fp32."},
    {"swiglu_backward", (PyCFunction)(void (*)(void))py_swiglu_backward, METH_FASTCALL,
     BACKWARD_SIGNATURE ": the gradients of gate and up, written at `grad_stride`, for the output's gradient "
                        "(rows, ff), contiguous; gate and up read as `swiglu` reads them; fp32."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, .m_name = "_activation", .m_size = -1, .m_methods = METHODS,
};

PyMODINIT_FUNC PyInit__activation(void) { return PyModule_Create(&MODULE); }
