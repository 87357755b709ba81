/* A product of a layer's weights that one compiled module offers another: how step.c's whole-layer
 * kernel multiplies by weights it does not lay out itself (a quantised linear's codes, through
 * compress/csrc/fused.c), without the core depending on who made them.
 *
 * A provider returns a PyCapsule named HERON_PRODUCT_CAPSULE whose pointer is a struct that begins
 * with a HeronProduct; the capsule keeps the weights' memory alive for as long as it lives. */
#ifndef HERON_PRODUCT_H
#define HERON_PRODUCT_H

#include <stdint.h>

#define HERON_PRODUCT_CAPSULE "heron.product"

typedef struct HeronProduct HeronProduct;

/* y (M, N) = x (M, K) @ Wᵀ for the provider's W, x and y contiguous, on `threads` OpenMP threads;
 * nonzero when memory ran out. Runs without the GIL. */
typedef int (*heron_product_fn)(const HeronProduct *self, const float *x, int64_t M, float *y, int threads);

struct HeronProduct {
    heron_product_fn run;
    int64_t N, K; /* the product's output and input widths */
};

#endif
