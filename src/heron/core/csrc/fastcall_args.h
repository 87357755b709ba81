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

#endif
