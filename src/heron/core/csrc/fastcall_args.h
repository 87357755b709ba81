/* Arguments of a METH_FASTCALL binding that takes addresses and sizes as Python ints
 * (core: step.c, activation.c, stream.c; compress/csrc/fused.c): the caller checks shapes and dtypes. */
#ifndef HERON_FASTCALL_ARGS_H
#define HERON_FASTCALL_ARGS_H

#include <Python.h>
#include <stdint.h>

static inline int ints(PyObject *const *args, Py_ssize_t n, int64_t *out) {
    for (Py_ssize_t i = 0; i < n; i++) out[i] = PyLong_AsLongLong(args[i]);
    return PyErr_Occurred() ? -1 : 0;
}

/* A call's first n_ints arguments as integers into v; -1 with a TypeError naming the signature
 * unless it was given `expected` arguments, or with the conversion's error. */
static inline int unpack(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, Py_ssize_t n_ints,
                         const char *signature, int64_t *v) {
    if (nargs != expected) {
        PyErr_SetString(PyExc_TypeError, signature);
        return -1;
    }
    return ints(args, n_ints, v);
}

#define AVX512_SIGNATURE "avx512(enable=None)"

/* The argument of a module's AVX-512 switch (`avx512(enable=None)` in stream.c and fused.c, so that
 * tests run both bodies on one machine): 1 with *enable set when one was given (not None) and this
 * CPU runs that body (AVX-512F, or AVX2 with FMA), 0 when none was, -1 with the error set. */
static inline int avx512_switch(PyObject *const *args, Py_ssize_t nargs, int *enable) {
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, AVX512_SIGNATURE);
        return -1;
    }
    if (nargs == 0 || args[0] == Py_None) return 0;
    *enable = PyObject_IsTrue(args[0]);
    if (*enable < 0) return -1;
    const int runs = *enable ? __builtin_cpu_supports("avx512f")
                             : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!runs) {
        PyErr_SetString(PyExc_ValueError, *enable ? "avx512: this CPU has no AVX-512F"
                                                  : "avx512: this CPU has no AVX2 with FMA");
        return -1;
    }
    return 1;
}

#endif
