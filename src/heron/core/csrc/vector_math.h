/* Vectorised elementwise maths shared by step.c (decoding) and activation.c (SwiGLU in and out of
 * training): GCC's vector types, an exponential of Heron's own, and SwiGLU with its gradient. */
#ifndef HERON_VECTOR_MATH_H
#define HERON_VECTOR_MATH_H

#include <math.h>
#include <stdint.h>

/* Compiled for x86-64-v4 (AVX-512), v3 (AVX2, FMA) and the baseline; the loader picks the one this CPU
 * runs (GCC's target_clones). */
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MAY_BE_UNUSED __attribute__((unused)) /* a kernel here that an includer does not call */

/* Always inlined into the kernels, which carry their own targets; it returns a 32-byte vector,
 * which GCC warns changes the ABI without AVX: a concern for calls it never makes. */
#pragma GCC diagnostic ignored "-Wpsabi"
#define VECTOR_INLINE static inline __attribute__((always_inline))

/* Eight floats, in registers (v8f, v8i) and at any float's address in memory (V8F_AT). */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f_unaligned __attribute__((vector_size(32), aligned(4), may_alias));
#define V8F_AT(p) (*(v8f_unaligned *)(p))

/* a where mask (all bits set), else b, lane by lane */
#define SELECT8(mask, a, b) ((v8f)(((v8i)(a) & (mask)) | ((v8i)(b) & ~(mask))))

/* e^x lane by lane for x at `at`: Cephes' expf, 2^n times a degree-6 polynomial on [-ln2/2, ln2/2], within 2 ulp.
 * Written in vector types because GCC vectorises neither glibc's expf nor this in a loop. */
VECTOR_INLINE v8f exp8(const v8f *at) {
    v8f x = *at;
    const v8f low = (v8f){} - 87.3f, high = (v8f){} + 88.7f;
    x = SELECT8(x < low, low, x);
    x = SELECT8(x > high, high, x);
    const v8f t = x * 1.44269504088896341f + 0.5f;
    v8f n = __builtin_convertvector(__builtin_convertvector(t, v8i), v8f); /* t rounded toward 0 ... */
    n += __builtin_convertvector(n > t, v8f);                              /* ... then down: floor(t) */
    const v8f r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8f p = (v8f){} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (v8f)((__builtin_convertvector(n, v8i) + 127) << 23); /* 2^n from its exponent bits */
}

/* out (rows, ff), contiguous, = silu(gate) * up, silu(x) = x / (1 + e^-x) as torch computes it; row r
 * of gate and of up begins r * stride floats after its first (the two halves of one (rows, 2 ff)
 * product have stride 2 ff). */
MAY_BE_UNUSED CLONES static void swiglu_rows(const float *gate, const float *up, int64_t stride, int64_t rows, int64_t ff,
                               float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate + r * stride, *u = up + r * stride;
        float *o = out + r * ff;
        int64_t i = 0;
        for (; i + 8 <= ff; i += 8) {
            const v8f x = V8F_AT(g + i), minus_x = -x;
            V8F_AT(o + i) = x / (1.0f + exp8(&minus_x)) * V8F_AT(u + i);
        }
        for (; i < ff; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* SwiGLU's gradient: for dy = d loss / d out (rows, ff), contiguous, d gate = dy * up * silu'(gate)
 * and d up = dy * silu(gate), with silu'(x) = s (1 + x (1 - s)), s = 1 / (1 + e^-x), as torch's
 * silu_backward; gate and up read as `swiglu_rows` does, d gate and d up written at `out_stride`. */
MAY_BE_UNUSED CLONES static void swiglu_grad_rows(const float *gate, const float *up, int64_t stride, const float *dy,
                                    int64_t rows, int64_t ff, float *d_gate, float *d_up, int64_t out_stride) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate + r * stride, *u = up + r * stride, *dyr = dy + r * ff;
        float *dg = d_gate + r * out_stride, *du = d_up + r * out_stride;
        int64_t i = 0;
        for (; i + 8 <= ff; i += 8) {
            const v8f x = V8F_AT(g + i), minus_x = -x, s = 1.0f / (1.0f + exp8(&minus_x)), grad = V8F_AT(dyr + i);
            V8F_AT(du + i) = grad * (x * s);
            V8F_AT(dg + i) = grad * V8F_AT(u + i) * (s * (1.0f + x * (1.0f - s)));
        }
        for (; i < ff; i++) {
            const float x = g[i], s = 1.0f / (1.0f + expf(-x));
            du[i] = dyr[i] * (x * s);
            dg[i] = dyr[i] * u[i] * (s * (1.0f + x * (1.0f - s)));
        }
    }
}

#endif
