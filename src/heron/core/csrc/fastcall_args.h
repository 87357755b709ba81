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

/* An instruction-set switch's optional argument (`avx512(enable=None)` in stream.c and fused.c):
 * 1 with *enable set when one was given (not None), 0 when none was, -1 with a TypeError naming
 * the signature for more than one, or with the truth test's error. */
static inline int optional_switch(PyObject *const *args, Py_ssize_t nargs, const char *signature, int *enable) {
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, signature);
        return -1;
    }
    if (nargs == 0 || args[0] == Py_None) return 0;
    *enable = PyObject_IsTrue(args[0]);
    return *enable < 0 ? -1 : 1;
}

#endif
