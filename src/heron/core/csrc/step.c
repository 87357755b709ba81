/* The small operations of a decoding step, one call each: a dense attention
 * layer's work between its two products (RoPE, the KV-cache write and
 * attention over the cache, for one new token per row), RMSNorm, and the
 * embedding lookup; and, for the plainest layers (RMSNorm, dense attention,
 * SwiGLU), a whole Transformer layer in one call, each product either fp32
 * weights laid out for the streaming product of stream_mm.h or one that
 * another module offers (product.h: a quantised linear's, whose int8 `small`
 * step fell from ~3.7 to ~3.0 ms on the Zen 4 host once its layers ran here
 * rather than op by op). core/token_step.py calls them.
 *
 * Why: a decoding step of the `small` preset (8 layers, d_model 512) read its
 * 111 MB of weights in ~3.4 ms on the Zen 5 host and spent ~1 ms more on ~750
 * aten calls of a few microseconds each. Attention alone, between the qkv and
 * out products, took ~50 us a layer in ten calls, 33 us of them in
 * `scaled_dot_product_attention`, whose flash kernel sets up blocks and
 * threads for a query of one row. Here the same arithmetic for 8 heads of 64
 * over ~100 cached keys is a few microseconds. With these kernels a layer
 * still cost ~45 us in Python and torch's calls around ~10 us of kernels
 * (the `small` model at d_model 64, whose weights cost next to nothing to
 * read); `layer` runs the whole of it from C. What pruning and quantisation
 * save in weights then shows in the step's time.
 *
 * Numbers: fp32 throughout, the same formulas as the torch ops they replace,
 * summed in another order (within fp32 rounding of them, not bit for bit).
 * Each kernel is compiled for x86-64-v4 (AVX-512), v3 (AVX2, FMA) and the
 * baseline, and the loader picks the one this CPU runs (GCC's target_clones).
 * Threads (OpenMP, the runtime torch loaded) share out the heads once the
 * cache is long enough to be worth it, and the products' weights always. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastcall_args.h"
#include "product.h"
#include "stream_mm.h"
#include "vector_math.h"

#define MAX_HEAD_DIM 512
#define PARALLEL_WORK 65536 /* query heads x keys x head_dim below which one thread does it all */

/* out = rope(x) * factor: x * cos + rotate_half(x) * signed_sin (core/rope.py), or x * factor
 * without RoPE (cos NULL). */
CLONES static void rotate(const float *x, const float *cos, const float *signed_sin, int64_t hd, float factor,
                          float *out) {
    if (cos == NULL) {
        for (int64_t i = 0; i < hd; i++) out[i] = x[i] * factor;
        return;
    }
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) out[i] = (x[i] * cos[i] + x[i + half] * signed_sin[i]) * factor;
    for (int64_t i = half; i < hd; i++) out[i] = (x[i] * cos[i] + x[i - half] * signed_sin[i]) * factor;
}

/* out (hd) = softmax(q . keys[j] * scale over the keys j with mask[j]) @ values; scores holds S floats. */
CLONES static void attend_head(const float *q, const float *keys, const float *values, int64_t S, int64_t hd,
                               float scale, const uint8_t *mask, float *scores, float *out) {
    float top = -INFINITY;
    for (int64_t j = 0; j < S; j++) {
        if (mask != NULL && !mask[j]) continue;
        const float *k = keys + j * hd;
        float s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < hd; i++) s += q[i] * k[i];
        scores[j] = s * scale;
        if (scores[j] > top) top = scores[j];
    }
    float total = 0;
    for (int64_t j = 0; j < S; j++) {
        scores[j] = (mask != NULL && !mask[j]) ? 0.0f : expf(scores[j] - top);
        total += scores[j];
    }
    memset(out, 0, sizeof(float) * hd);
    for (int64_t j = 0; j < S; j++) {
        const float p = scores[j], *v = values + j * hd;
#pragma omp simd
        for (int64_t i = 0; i < hd; i++) out[i] += p * v[i];
    }
    const float inverse = 1.0f / total;
    for (int64_t i = 0; i < hd; i++) out[i] *= inverse;
}

typedef struct {
    const float *qkv;             /* (B, (nq + 2 nkv) hd): q heads, then k heads, then v heads */
    int64_t B, nq, nkv, hd;
    const float *cos, *sin;       /* RoPE rows (hd) for each row of the batch, `rope_stride` apart; NULL: none */
    int64_t rope_stride;          /* 0: one position for every row */
    float q_factor;               /* q's extra scale after RoPE (1 for none) */
    float *keys, *values;         /* the layer's cache, (B, nkv, slots, hd) */
    int64_t slots, length;        /* this token goes to slot `length`; attention sees slots 0..length */
    const uint8_t *key_mask;      /* (B, mask_stride) bool, true = real token; NULL: every key is */
    int64_t mask_stride;
    float *out;                   /* (B, nq hd) */
} Attention;

/* Writes each row's rotated key and its value into the cache, then attends every query head
 * over the cache's first length + 1 slots; nonzero when scratch memory could not be allocated. */
static int attend(const Attention *a, int threads) {
    const int64_t hd = a->hd, width = (a->nq + 2 * a->nkv) * hd, S = a->length + 1, group = a->nq / a->nkv;
    for (int64_t b = 0; b < a->B; b++) {
        const float *row = a->qkv + b * width;
        const float *cos = a->cos ? a->cos + b * a->rope_stride : NULL, *sin = a->sin ? a->sin + b * a->rope_stride : NULL;
        for (int64_t g = 0; g < a->nkv; g++) {
            const int64_t slot = ((b * a->nkv + g) * a->slots + a->length) * hd;
            rotate(row + (a->nq + g) * hd, cos, sin, hd, 1.0f, a->keys + slot);
            memcpy(a->values + slot, row + (a->nq + a->nkv + g) * hd, sizeof(float) * hd);
        }
    }
    const int parallel = a->B * a->nq * S * hd >= PARALLEL_WORK && threads > 1;
    const int team = parallel ? threads : 1;
    float *scratch = malloc(sizeof(float) * (size_t)team * (S + MAX_HEAD_DIM));
    if (scratch == NULL) return 1;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for num_threads(team) if (parallel) schedule(static)
    for (int64_t bh = 0; bh < a->B * a->nq; bh++) {
        const int64_t b = bh / a->nq, h = bh % a->nq, g = h / group;
        float *scores = scratch + (int64_t)omp_get_thread_num() * (S + MAX_HEAD_DIM), *q = scores + S;
        const float *cos = a->cos ? a->cos + b * a->rope_stride : NULL, *sin = a->sin ? a->sin + b * a->rope_stride : NULL;
        rotate(a->qkv + b * width + h * hd, cos, sin, hd, a->q_factor, q);
        const int64_t head = (b * a->nkv + g) * a->slots * hd;
        attend_head(q, a->keys + head, a->values + head, S, hd, scale,
                    a->key_mask ? a->key_mask + b * a->mask_stride : NULL, scores, a->out + (b * a->nq + h) * hd);
    }
    free(scratch);
    return 0;
}

/* y (rows, width) = x / sqrt(mean(x^2) + eps) * weight, row by row. */
CLONES static void rms_norm(const float *x, int64_t rows, int64_t width, const float *weight, float eps, float *y) {
    for (int64_t r = 0; r < rows; r++, x += width, y += width) {
        float s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < width; i++) s += x[i] * x[i];
        const float inverse = 1.0f / sqrtf(s / (float)width + eps);
        for (int64_t i = 0; i < width; i++) y[i] = x[i] * inverse * weight[i];
    }
}

/* y (rows, n) = a + b (+ bias (n), added to b first: a product's output and its bias) */
static void add_rows(const float *a, const float *b, const float *bias, int64_t rows, int64_t n, float *y) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i++) y[r * n + i] = a[r * n + i] + (bias ? b[r * n + i] + bias[i] : b[r * n + i]);
}

static void add_bias(float *y, const float *bias, int64_t rows, int64_t n) {
    if (bias == NULL) return;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i++) y[r * n + i] += bias[i];
}

static rows_into_fn ROWS_INTO_HERE;

/* One of a layer's products: fp32 weights laid out input-major (their (K, N) transpose row-major)
 * through the streaming product, or a product another module offers (a quantised linear's: product.h). */
typedef struct {
    const float *wt;            /* NULL where `offered` is set */
    const HeronProduct *offered;
    const float *bias;          /* (N), or NULL */
} Product;

/* y (M, N) = x (M, K) @ the product's weights (no bias); nonzero when memory ran out. */
static int multiply(const Product *p, const float *x, int64_t M, int64_t N, int64_t K, float *y, int threads) {
    if (p->offered != NULL) return p->offered->run(p->offered, x, M, y, threads);
    return stream_mm(ROWS_INTO_HERE, x, M, p->wt, N, K, y, threads);
}

/* One Transformer layer's weights. */
typedef struct {
    int64_t d, ff;                      /* model width; SwiGLU's hidden width (`up` gives gate, then up) */
    const float *attn_norm, *mlp_norm;  /* RMSNorm gains (d) */
    float attn_eps, mlp_eps;
    Product qkv, out, up, down;
    int parallel_residual;              /* the MLP reads the layer's input, not the attention's sum */
} Layer;

/* y (B, d) = the layer applied to x (B, d) for one new token per row, the attention's cache, RoPE
 * rows and mask in `a` (its qkv and out are set here); nonzero when memory ran out. */
static int run_layer(const Layer *L, const float *x, float *y, Attention *a, int threads) {
    const int64_t B = a->B, d = L->d, ff = L->ff, width = (a->nq + 2 * a->nkv) * a->hd, z = a->nq * a->hd;
    float *scratch = malloc(sizeof(float) * (size_t)B * (d + width + z + d + 3 * ff));
    if (scratch == NULL) return 1;
    float *h = scratch, *qkv = h + B * d, *heads = qkv + B * width, *product = heads + B * z, *up = product + B * d,
          *gated = up + B * 2 * ff;
    int failed = 0;
    rms_norm(x, B, d, L->attn_norm, L->attn_eps, h);
    failed |= multiply(&L->qkv, h, B, width, d, qkv, threads);
    add_bias(qkv, L->qkv.bias, B, width);
    a->qkv = qkv;
    a->out = heads;
    failed |= attend(a, threads);
    failed |= multiply(&L->out, heads, B, d, z, product, threads);
    add_rows(x, product, L->out.bias, B, d, y); /* y = x + attention */
    rms_norm(L->parallel_residual ? x : y, B, d, L->mlp_norm, L->mlp_eps, h);
    failed |= multiply(&L->up, h, B, 2 * ff, d, up, threads);
    add_bias(up, L->up.bias, B, 2 * ff);
    swiglu_rows(up, up + ff, 2 * ff, B, ff, gated);
    failed |= multiply(&L->down, gated, B, d, ff, product, threads);
    add_rows(y, product, L->down.bias, B, d, y); /* y += mlp */
    free(scratch);
    return failed;
}

/* ---- Python bindings: addresses and sizes in, the caller checks shapes and dtypes ---- */

#define ATTEND_SIGNATURE                                                                                     \
    "attend(qkv_ptr, B, n_q, n_kv, head_dim, cos_ptr, sin_ptr, rope_stride, keys_ptr, values_ptr, slots, " \
    "length, key_mask_ptr, mask_stride, out_ptr, threads, q_factor)"

static PyObject *py_attend(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[16];
    if (unpack(args, nargs, 17, 16, ATTEND_SIGNATURE, v)) return NULL;
    const double q_factor = PyFloat_AsDouble(args[16]);
    if (PyErr_Occurred()) return NULL;
    const Attention a = {
        .qkv = (const float *)(intptr_t)v[0], .B = v[1], .nq = v[2], .nkv = v[3], .hd = v[4],
        .cos = (const float *)(intptr_t)v[5], .sin = (const float *)(intptr_t)v[6], .rope_stride = v[7],
        .q_factor = (float)q_factor, .keys = (float *)(intptr_t)v[8], .values = (float *)(intptr_t)v[9],
        .slots = v[10], .length = v[11], .key_mask = (const uint8_t *)(intptr_t)v[12], .mask_stride = v[13],
        .out = (float *)(intptr_t)v[14],
    };
    const int threads = (int)v[15];
    if (a.B < 1 || a.nkv < 1 || a.nq % a.nkv || a.hd < 1 || a.hd > MAX_HEAD_DIM || (a.cos && a.hd % 2) ||
        a.length < 0 || a.length >= a.slots || threads < 1) {
        PyErr_SetString(PyExc_ValueError, ATTEND_SIGNATURE ": needs B >= 1, n_q a multiple of n_kv >= 1, "
                                          "head_dim 1 to 512 (even with RoPE), 0 <= length < slots, threads >= 1");
        return NULL;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = attend(&a, threads);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

#define LAYER_SIGNATURE                                                                                     \
    "layer(weights, x_ptr, y_ptr, B, keys_ptr, values_ptr, slots, length, key_mask_ptr, mask_stride, cos_ptr, " \
    "sin_ptr, rope_stride, threads)"
#define LAYER_WEIGHTS                                                                                        \
    "weights: (d, ff, n_q, n_kv, head_dim, attn_norm_ptr, mlp_norm_ptr, qkv, qkv_bias_ptr, out, "           \
    "out_bias_ptr, up, up_bias_ptr, down, down_bias_ptr, parallel_residual, attn_eps, mlp_eps, q_factor)"

/* A product from its two entries of `weights`: its weights (the address of fp32 ones laid out input-major,
 * or a capsule that offers the product: product.h) and its bias's address (0: none); -1 with an error set
 * where neither, or where an offered product's shape is not the N x K the layer needs. */
static int product_from(PyObject *const *entries, int64_t N, int64_t K, const char *name, Product *p) {
    *p = (Product){.bias = (const float *)(intptr_t)PyLong_AsLongLong(entries[1])};
    if (PyErr_Occurred()) return -1;
    if (!PyCapsule_CheckExact(entries[0])) {
        p->wt = (const float *)(intptr_t)PyLong_AsLongLong(entries[0]);
        return PyErr_Occurred() ? -1 : 0;
    }
    p->offered = PyCapsule_GetPointer(entries[0], HERON_PRODUCT_CAPSULE);
    if (p->offered == NULL) return -1;
    if (p->offered->N != N || p->offered->K != K) {
        PyErr_Format(PyExc_ValueError, "layer: the %s product offered is %lld x %lld where the layer needs %lld x %lld",
                     name, (long long)p->offered->N, (long long)p->offered->K, (long long)N, (long long)K);
        return -1;
    }
    return 0;
}

static PyObject *py_layer(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t w[7], parallel, v[13];
    double f[3];
    if (nargs != 14 || !PyTuple_Check(args[0]) || PyTuple_GET_SIZE(args[0]) != 19) {
        PyErr_SetString(PyExc_TypeError, LAYER_SIGNATURE "; " LAYER_WEIGHTS);
        return NULL;
    }
    PyObject *const *weights = &PyTuple_GET_ITEM(args[0], 0);
    for (int i = 0; i < 3; i++) f[i] = PyFloat_AsDouble(weights[16 + i]);
    if (ints(weights, 7, w) || ints(weights + 15, 1, &parallel) || ints(args + 1, 13, v)) return NULL;
    Layer L = {
        .d = w[0], .ff = w[1], .attn_norm = (const float *)(intptr_t)w[5], .mlp_norm = (const float *)(intptr_t)w[6],
        .parallel_residual = (int)parallel, .attn_eps = (float)f[0], .mlp_eps = (float)f[1],
    };
    Attention a = {
        .B = v[2], .nq = w[2], .nkv = w[3], .hd = w[4], .q_factor = (float)f[2],
        .keys = (float *)(intptr_t)v[3], .values = (float *)(intptr_t)v[4], .slots = v[5], .length = v[6],
        .key_mask = (const uint8_t *)(intptr_t)v[7], .mask_stride = v[8],
        .cos = (const float *)(intptr_t)v[9], .sin = (const float *)(intptr_t)v[10], .rope_stride = v[11],
    };
    const int threads = (int)v[12];
    if (ROWS_INTO_HERE == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "layer: this CPU has neither AVX-512F nor AVX2 with FMA");
        return NULL;
    }
    if (a.B < 1 || a.B > MAX_ROWS || L.d < 1 || L.ff < 1 || a.nkv < 1 || a.nq % a.nkv || a.hd < 1 ||
        a.hd > MAX_HEAD_DIM || (a.cos && a.hd % 2) || a.length < 0 || a.length >= a.slots || threads < 1) {
        PyErr_SetString(PyExc_ValueError, LAYER_SIGNATURE ": needs B 1 to 8, d and ff >= 1, n_q a multiple of "
                                          "n_kv >= 1, head_dim 1 to 512 (even with RoPE), 0 <= length < slots, "
                                          "threads >= 1");
        return NULL;
    }
    const int64_t qkv_width = (a.nq + 2 * a.nkv) * a.hd;
    if (product_from(weights + 7, qkv_width, L.d, "qkv", &L.qkv) ||
        product_from(weights + 9, L.d, a.nq * a.hd, "out", &L.out) ||
        product_from(weights + 11, 2 * L.ff, L.d, "up", &L.up) ||
        product_from(weights + 13, L.d, L.ff, "down", &L.down))
        return NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = run_layer(&L, (const float *)(intptr_t)v[0], (float *)(intptr_t)v[1], &a, threads);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

#define RMS_NORM_SIGNATURE "rms_norm(x_ptr, rows, width, weight_ptr, y_ptr, eps)"

static PyObject *py_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[5];
    if (unpack(args, nargs, 6, 5, RMS_NORM_SIGNATURE, v)) return NULL;
    const double eps = PyFloat_AsDouble(args[5]);
    if (PyErr_Occurred()) return NULL;
    if (v[1] < 1 || v[2] < 1) {
        PyErr_SetString(PyExc_ValueError, RMS_NORM_SIGNATURE ": rows and width must be at least 1");
        return NULL;
    }
    rms_norm((const float *)(intptr_t)v[0], v[1], v[2], (const float *)(intptr_t)v[3], (float)eps,
             (float *)(intptr_t)v[4]);
    Py_RETURN_NONE;
}

#define EMBED_SIGNATURE "embed(ids_ptr, n, table_ptr, vocab, width, row_stride, column_stride, out_ptr)"

/* out (n, width) = table[ids]: rows of a (vocab, width) fp32 table read through its strides
 * (an output head's weight laid out input-major, tied to the embedding, has column stride vocab). */
static PyObject *py_embed(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[8];
    if (unpack(args, nargs, 8, 8, EMBED_SIGNATURE, v)) return NULL;
    const int64_t *ids = (const int64_t *)(intptr_t)v[0], n = v[1], vocab = v[3], width = v[4];
    const float *table = (const float *)(intptr_t)v[2];
    float *out = (float *)(intptr_t)v[7];
    for (int64_t r = 0; r < n; r++) {
        if (ids[r] < 0 || ids[r] >= vocab) {
            PyErr_Format(PyExc_IndexError, "embed: token id %lld is out of range for a vocabulary of %lld",
                         (long long)ids[r], (long long)vocab);
            return NULL;
        }
        const float *row = table + ids[r] * v[5];
        for (int64_t i = 0; i < width; i++) out[r * width + i] = row[i * v[6]];
    }
    Py_RETURN_NONE;
}

static PyMethodDef METHODS[] = {
    {"attend", (PyCFunction)(void (*)(void))py_attend, METH_FASTCALL,
     ATTEND_SIGNATURE ": one new token per row of a dense attention layer: RoPE on q and k, k and v "
                      "written to the cache at `length`, attention over slots 0..length; all fp32, contiguous."},
    {"layer", (PyCFunction)(void (*)(void))py_layer, METH_FASTCALL,
     LAYER_SIGNATURE ": y (B, d) = one RMSNorm, dense-attention, SwiGLU layer applied to x (B, d), one new "
                     "token per row (the cache as `attend` takes it); " LAYER_WEIGHTS ", each product's weights "
                     "the address of fp32 ones laid out input-major or a capsule offering the product "
                     "(csrc/product.h), the rest fp32 and contiguous; RuntimeError where the streaming product "
                     "does not run (heron.core._stream.supported())."},
    {"rms_norm", (PyCFunction)(void (*)(void))py_rms_norm, METH_FASTCALL,
     RMS_NORM_SIGNATURE ": y = x / sqrt(mean(x^2) + eps) * weight over each row; contiguous fp32."},
    {"embed", (PyCFunction)(void (*)(void))py_embed, METH_FASTCALL,
     EMBED_SIGNATURE ": the table's rows for int64 ids, read through its strides; IndexError for an id out of "
                     "range."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, .m_name = "_step", .m_size = -1, .m_methods = METHODS,
};

PyMODINIT_FUNC PyInit__step(void) {
    ROWS_INTO_HERE = pick();
    return PyModule_Create(&MODULE);
}
