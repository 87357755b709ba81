/* The small operations of a decoding step, one call each: a dense attention
 * layer's work between its two products (RoPE, the KV-cache write and
 * attention over the cache, for one new token per row), RMSNorm, and the
 * embedding lookup; and, for plain layers (RMSNorm or LayerNorm, dense or
 * sliding/dilated-window attention, or the keys a mask picks (strided, fixed,
 * bigbird), with or without qk_norm, an MLP with SwiGLU
 * or GELU, or a MoE of such experts), a whole Transformer layer in one call
 * (`small`-shaped steps 1.38x as fast as in parts with qk_norm, 1.24x
 * GPT-2-style, 1.39x with every other layer a sliding window)
 * (a Mixtral-shaped step 1.33x as fast in fp32, 1.72x in int8, as the MoE's
 * routing and its experts' products left Python), each product either fp32
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
        if (mask != NULL && !mask[j]) continue; /* a sparse pattern's step reads only the values it sees */
        const float p = scores[j], *v = values + j * hd;
#pragma omp simd
        for (int64_t i = 0; i < hd; i++) out[i] += p * v[i];
    }
    const float inverse = 1.0f / total;
    for (int64_t i = 0; i < hd; i++) out[i] *= inverse;
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

/* y (rows, width) = (x - mean) / sqrt(var + eps) * weight + bias, row by row (torch's layer_norm: the
 * biased variance; bias may be NULL). */
CLONES static void layer_norm(const float *x, int64_t rows, int64_t width, const float *weight, const float *bias,
                              float eps, float *y) {
    for (int64_t r = 0; r < rows; r++, x += width, y += width) {
        float sum = 0, squares = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < width; i++) sum += x[i];
        const float mean = sum / (float)width;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < width; i++) squares += (x[i] - mean) * (x[i] - mean);
        const float inverse = 1.0f / sqrtf(squares / (float)width + eps);
        for (int64_t i = 0; i < width; i++) y[i] = (x[i] - mean) * inverse * weight[i] + (bias ? bias[i] : 0.0f);
    }
}

/* A layer's norm: RMSNorm, or LayerNorm where `layer` says so. */
typedef struct {
    const float *weight, *bias; /* (d); bias LayerNorm's only, may be NULL */
    float eps;
    int layer;                  /* LayerNorm, not RMSNorm */
} Norm;

static void normalize(const Norm *n, const float *x, int64_t rows, int64_t width, float *y) {
    if (n->layer)
        layer_norm(x, rows, width, n->weight, n->bias, n->eps, y);
    else
        rms_norm(x, rows, width, n->weight, n->eps, y);
}

typedef struct {
    const float *qkv;             /* (B, (nq + 2 nkv) hd): q heads, then k heads, then v heads */
    int64_t B, nq, nkv, hd;
    const float *cos, *sin;       /* RoPE rows (hd) for each row of the batch, `rope_stride` apart; NULL: none */
    int64_t rope_stride;          /* 0: one position for every row */
    float q_factor;               /* q's extra scale after RoPE (1 for none) */
    float *keys, *values;         /* the layer's cache, (B, nkv, slots, hd) */
    int64_t slots, length;        /* this token goes to slot `length`; attention sees slots 0..length */
    const uint8_t *key_mask;      /* (B, mask_stride) bool, true = a key this token may see (a real token, or
                                   * a sparse pattern's pick); NULL: every key; mask_stride 0: one row for all */
    int64_t mask_stride;
    float *out;                   /* (B, nq hd) */
    const float *q_norm, *k_norm; /* (hd) RMSNorm gains of each q and k head before RoPE (qk_norm); NULL: none */
    float qk_eps;
    int64_t window, dilation;     /* a sliding (dilation 1) or dilated window of this many keys; window 0: dense */
    int ring;                     /* the cache is a ring of `slots` (a bounded window's: token t in slot t % slots) */
} Attention;

/* Writes each row's rotated key and its value into the cache, then attends every query head
 * over the cache's first length + 1 slots; nonzero when scratch memory could not be allocated. */
static int attend(const Attention *a, int threads) {
    const int64_t hd = a->hd, width = (a->nq + 2 * a->nkv) * hd, group = a->nq / a->nkv, length = a->length;
    /* the slot this token goes to, and the slots filled once it is there */
    const int64_t written = a->ring ? length % a->slots : length;
    const int64_t S = a->ring && length + 1 > a->slots ? a->slots : length + 1;
    float normed[MAX_HEAD_DIM];
    for (int64_t b = 0; b < a->B; b++) {
        const float *row = a->qkv + b * width;
        const float *cos = a->cos ? a->cos + b * a->rope_stride : NULL, *sin = a->sin ? a->sin + b * a->rope_stride : NULL;
        for (int64_t g = 0; g < a->nkv; g++) {
            const int64_t slot = ((b * a->nkv + g) * a->slots + written) * hd;
            const float *k = row + (a->nq + g) * hd;
            if (a->k_norm != NULL) {
                rms_norm(k, 1, hd, a->k_norm, a->qk_eps, normed);
                k = normed;
            }
            rotate(k, cos, sin, hd, 1.0f, a->keys + slot);
            memcpy(a->values + slot, row + (a->nq + a->nkv + g) * hd, sizeof(float) * hd);
        }
    }
    /* A windowed layer: the slots each row's new token may see. The window is a rule on a row's real
     * tokens (core/sparse.py, `token_index`): a key's distance is the number of real tokens from it up to,
     * not including, the query, counted back from the query into `real_from` (offset k: token length - k). */
    uint8_t *in_window = NULL;
    int64_t *real_from = NULL;
    if (a->window > 0) {
        const int64_t back = a->ring && a->slots - 1 < length ? a->slots - 1 : length; /* the oldest key held */
        in_window = malloc((size_t)(a->B * S));
        real_from = malloc(sizeof(int64_t) * (size_t)(back + 1));
        if (in_window == NULL || real_from == NULL) {
            free(in_window);
            free(real_from);
            return 1;
        }
        for (int64_t b = 0; b < a->B; b++) {
            const uint8_t *real = a->key_mask ? a->key_mask + b * a->mask_stride : NULL;
            real_from[0] = 0;
            for (int64_t k = 1; k <= back; k++) real_from[k] = real_from[k - 1] + (real ? real[length - k] : 1);
            for (int64_t s = 0; s < S; s++) {
                const int64_t token = a->ring ? s + (length - s) / a->slots * a->slots : s;
                const int64_t distance = real_from[length - token];
                in_window[b * S + s] = (real == NULL || real[token]) && distance % a->dilation == 0 &&
                                       distance / a->dilation < a->window;
            }
        }
        free(real_from);
    }
    const int parallel = a->B * a->nq * S * hd >= PARALLEL_WORK && threads > 1;
    const int team = parallel ? threads : 1;
    const int64_t per_thread = S + 2 * MAX_HEAD_DIM; /* scores, then the rotated q, then the normalised one */
    float *scratch = malloc(sizeof(float) * (size_t)(team * per_thread));
    if (scratch == NULL) {
        free(in_window);
        return 1;
    }
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for num_threads(team) if (parallel) schedule(static)
    for (int64_t bh = 0; bh < a->B * a->nq; bh++) {
        const int64_t b = bh / a->nq, h = bh % a->nq, g = h / group;
        float *scores = scratch + (int64_t)omp_get_thread_num() * per_thread, *q = scores + S, *q_normed = q + MAX_HEAD_DIM;
        const float *cos = a->cos ? a->cos + b * a->rope_stride : NULL, *sin = a->sin ? a->sin + b * a->rope_stride : NULL;
        const float *projected = a->qkv + b * width + h * hd;
        if (a->q_norm != NULL) {
            rms_norm(projected, 1, hd, a->q_norm, a->qk_eps, q_normed);
            projected = q_normed;
        }
        rotate(projected, cos, sin, hd, a->q_factor, q);
        const int64_t head = (b * a->nkv + g) * a->slots * hd;
        const uint8_t *mask = in_window != NULL ? in_window + b * S : a->key_mask ? a->key_mask + b * a->mask_stride : NULL;
        attend_head(q, a->keys + head, a->values + head, S, hd, scale, mask, scores, a->out + (b * a->nq + h) * hd);
    }
    free(scratch);
    free(in_window);
    return 0;
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

enum { SWIGLU, GELU, GELU_TANH }; /* a feed-forward's activation (core/mlp.py's kinds) */

/* The width of `up`'s output for hidden width ff: SwiGLU's holds gate, then up. */
static int64_t up_width(int activation, int64_t ff) { return activation == SWIGLU ? 2 * ff : ff; }

/* gelu over n values, in place: torch's F.gelu, exact (erf) or its tanh approximation. */
static void gelu(float *h, int64_t n, int tanh_form) {
    for (int64_t i = 0; i < n; i++) {
        const float x = h[i];
        h[i] = tanh_form ? 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)))
                         : 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    }
}

/* out (rows, d) = an MLP of h (rows, d): down(act(up(h))), each product's bias added to it; nonzero
 * when memory ran out. */
static int feed_forward(int activation, const Product *up, const Product *down, const float *h, int64_t rows,
                        int64_t d, int64_t ff, float *out, int threads) {
    const int64_t width = up_width(activation, ff);
    float *wide = malloc(sizeof(float) * (size_t)(rows * (width + ff)));
    if (wide == NULL) return 1;
    float *hidden = wide + rows * width;
    int failed = multiply(up, h, rows, width, d, wide, threads);
    add_bias(wide, up->bias, rows, width);
    if (activation == SWIGLU) {
        swiglu_rows(wide, wide + ff, 2 * ff, rows, ff, hidden);
    } else {
        gelu(wide, rows * ff, activation == GELU_TANH);
        hidden = wide;
    }
    failed |= multiply(down, hidden, rows, d, ff, out, threads);
    add_bias(out, down->bias, rows, d);
    free(wide);
    return failed;
}

/* A Mixture-of-Experts feed-forward (core/moe.py) for a few tokens, as `MoE.decode_step` computes it. */
typedef struct {
    int activation;               /* the experts' (and the shared expert's) */
    int64_t E, k, ff;             /* experts; experts a token; an expert's hidden width */
    const float *router;          /* (E, d) router weight */
    const float *center;          /* (d) subtracted from a token before routing (router centring), or NULL */
    float scale;                  /* the chosen experts' weights times this (the routed scale) */
    const Product *up, *down;     /* E each: up (up_width x d), down (d x ff) */
    int64_t shared_ff;            /* the shared expert's hidden width; 0: none */
    Product shared_up, shared_down;
    float *probs;                 /* out (B, E): each token's router probabilities */
    int64_t *experts;             /* out (B, k): its experts, the most probable first */
} MoE;

/* Each row's router probabilities (softmax of its logits), its top-k experts and their weights (B, k):
 * renormalised to sum to one for k > 1, then times the routed scale (core/moe.py, `route`). */
static void route_rows(const MoE *m, const float *h, int64_t B, int64_t d, float *weights) {
    const int64_t E = m->E, k = m->k;
    for (int64_t b = 0; b < B; b++) {
        const float *row = h + b * d;
        float *p = m->probs + b * E, top = -INFINITY, total = 0;
        for (int64_t e = 0; e < E; e++) {
            const float *w = m->router + e * d;
            float s = 0;
            for (int64_t i = 0; i < d; i++) s += (m->center ? row[i] - m->center[i] : row[i]) * w[i];
            p[e] = s;
            if (s > top) top = s;
        }
        for (int64_t e = 0; e < E; e++) total += (p[e] = expf(p[e] - top));
        for (int64_t e = 0; e < E; e++) p[e] /= total;
        int64_t *chosen = m->experts + b * k;
        float *gate = weights + b * k, sum = 0;
        for (int64_t j = 0; j < k; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t i = 0; i < j; i++) taken |= chosen[i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            chosen[j] = best;
            sum += (gate[j] = p[best]);
        }
        for (int64_t j = 0; j < k; j++) gate[j] = (k > 1 ? gate[j] / sum : gate[j]) * m->scale;
    }
}

/* out (B, d) = the MoE of h (B, d): each expert once, on the rows that chose it (in token order,
 * experts in order), its output weighed and added to theirs, then the shared expert's added;
 * nonzero when memory ran out. */
static int moe_mlp(const MoE *m, const float *h, int64_t B, int64_t d, float *out, int threads) {
    const int64_t k = m->k;
    float *scratch = malloc(sizeof(float) * (size_t)(B * (k + 1 + 2 * d)) + sizeof(int64_t) * (size_t)B);
    if (scratch == NULL) return 1;
    float *weights = scratch, *gates = weights + B * k, *rows = gates + B, *expert_out = rows + B * d;
    int64_t *tokens = (int64_t *)(expert_out + B * d);
    int failed = 0;
    route_rows(m, h, B, d, weights);
    memset(out, 0, sizeof(float) * (size_t)(B * d));
    for (int64_t e = 0; e < m->E; e++) {
        int64_t n = 0;
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < k; j++)
                if (m->experts[b * k + j] == e) tokens[n] = b, gates[n++] = weights[b * k + j];
        if (n == 0) continue;
        for (int64_t i = 0; i < n; i++) memcpy(rows + i * d, h + tokens[i] * d, sizeof(float) * d);
        failed |= feed_forward(m->activation, &m->up[e], &m->down[e], rows, n, d, m->ff, expert_out, threads);
        for (int64_t i = 0; i < n; i++)
            for (int64_t c = 0; c < d; c++) out[tokens[i] * d + c] += expert_out[i * d + c] * gates[i];
    }
    if (m->shared_ff > 0) {
        failed |= feed_forward(m->activation, &m->shared_up, &m->shared_down, h, B, d, m->shared_ff, expert_out,
                               threads);
        for (int64_t i = 0; i < B * d; i++) out[i] += expert_out[i];
    }
    free(scratch);
    return failed;
}

/* One Transformer layer's weights. */
typedef struct {
    int64_t d, ff;                      /* model width; the MLP's hidden width (SwiGLU: `up` gives gate, then up) */
    Norm attn_norm, mlp_norm;
    int activation;                     /* the MLP's or the MoE's experts': SWIGLU, GELU or GELU_TANH */
    Product qkv, out, up, down;         /* up and down unused where `moe` is set */
    const MoE *moe;                     /* the feed-forward is this MoE; NULL: the dense SwiGLU MLP */
    int parallel_residual;              /* the MLP reads the layer's input, not the attention's sum */
} Layer;

/* y (B, d) = the layer applied to x (B, d) for one new token per row, the attention's cache, RoPE
 * rows and mask in `a` (its qkv and out are set here); nonzero when memory ran out. */
static int run_layer(const Layer *L, const float *x, float *y, Attention *a, int threads) {
    const int64_t B = a->B, d = L->d, width = (a->nq + 2 * a->nkv) * a->hd, z = a->nq * a->hd;
    float *scratch = malloc(sizeof(float) * (size_t)B * (d + width + z + d));
    if (scratch == NULL) return 1;
    float *h = scratch, *qkv = h + B * d, *heads = qkv + B * width, *product = heads + B * z;
    int failed = 0;
    normalize(&L->attn_norm, x, B, d, h);
    failed |= multiply(&L->qkv, h, B, width, d, qkv, threads);
    add_bias(qkv, L->qkv.bias, B, width);
    a->qkv = qkv;
    a->out = heads;
    failed |= attend(a, threads);
    failed |= multiply(&L->out, heads, B, d, z, product, threads);
    add_rows(x, product, L->out.bias, B, d, y); /* y = x + attention */
    normalize(&L->mlp_norm, L->parallel_residual ? x : y, B, d, h);
    failed |= L->moe != NULL ? moe_mlp(L->moe, h, B, d, product, threads)
                             : feed_forward(L->activation, &L->up, &L->down, h, B, d, L->ff, product, threads);
    add_rows(y, product, NULL, B, d, y); /* y += mlp */
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
    "sin_ptr, rope_stride, threads, moe=None, ring=0)"
#define LAYER_WEIGHTS                                                                                        \
    "weights: (d, ff, n_q, n_kv, head_dim, attn_norm_ptr, mlp_norm_ptr, qkv, qkv_bias_ptr, out, "           \
    "out_bias_ptr, up, up_bias_ptr, down, down_bias_ptr, parallel_residual, attn_eps, mlp_eps, q_factor, "     \
    "q_norm_ptr, k_norm_ptr, qk_eps, layer_norm, attn_norm_bias_ptr, mlp_norm_bias_ptr, activation, window, " \
    "dilation), the q and k norms' gains 0 for none, layer_norm 1 for LayerNorms (else RMSNorms), activation 0 " \
    "SwiGLU, 1 GELU, 2 GELU (tanh), window 0 for dense attention (else a sliding or dilated window over each " \
    "row's real tokens)"
#define LAYER_MOE                                                                                            \
    "moe: (n_experts, top_k, expert_ff, router_ptr, center_ptr, routed_scale, ups, downs, shared_ff, "       \
    "shared_up, shared_up_bias_ptr, shared_down, shared_down_bias_ptr, probs_ptr, experts_ptr), ups and "     \
    "downs a tuple of n_experts products each"

/* A product from its weights (the address of fp32 ones laid out input-major, or a capsule that offers
 * the product: product.h) and its bias's address (0, or NULL for no entry: none); -1 with an error set
 * where neither, or where an offered product's shape is not the N x K the layer needs. */
static int product_from(PyObject *weights, PyObject *bias, int64_t N, int64_t K, const char *name, Product *p) {
    *p = (Product){.bias = bias == NULL ? NULL : (const float *)(intptr_t)PyLong_AsLongLong(bias)};
    if (PyErr_Occurred()) return -1;
    if (!PyCapsule_CheckExact(weights)) {
        p->wt = (const float *)(intptr_t)PyLong_AsLongLong(weights);
        return PyErr_Occurred() ? -1 : 0;
    }
    p->offered = PyCapsule_GetPointer(weights, HERON_PRODUCT_CAPSULE);
    if (p->offered == NULL) return -1;
    if (p->offered->N != N || p->offered->K != K) {
        PyErr_Format(PyExc_ValueError, "layer: the %s product offered is %lld x %lld where the layer needs %lld x %lld",
                     name, (long long)p->offered->N, (long long)p->offered->K, (long long)N, (long long)K);
        return -1;
    }
    return 0;
}

/* The MoE of `layer`'s `moe` tuple (LAYER_MOE) into m, its experts' products into `experts` (2 E,
 * freed by the caller); -1 with an error set where it is not one. */
static int moe_from(PyObject *entries, int64_t d, int activation, MoE *m, Product **experts) {
    int64_t v[6];
    if (!PyTuple_Check(entries) || PyTuple_GET_SIZE(entries) != 15) {
        PyErr_SetString(PyExc_TypeError, "layer: " LAYER_MOE);
        return -1;
    }
    PyObject *const *e = &PyTuple_GET_ITEM(entries, 0);
    const double scale = PyFloat_AsDouble(e[5]);
    if (ints(e, 5, v) || ints(e + 8, 1, v + 5) || PyErr_Occurred()) return -1;
    *m = (MoE){.activation = activation, .E = v[0], .k = v[1], .ff = v[2], .router = (const float *)(intptr_t)v[3],
               .center = (const float *)(intptr_t)v[4], .scale = (float)scale, .shared_ff = v[5]};
    int64_t out[2];
    if (ints(e + 13, 2, out)) return -1;
    m->probs = (float *)(intptr_t)out[0];
    m->experts = (int64_t *)(intptr_t)out[1];
    if (m->E < 1 || m->k < 1 || m->k > m->E || m->ff < 1 || m->shared_ff < 0 || !PyTuple_Check(e[6]) ||
        !PyTuple_Check(e[7]) || PyTuple_GET_SIZE(e[6]) != m->E || PyTuple_GET_SIZE(e[7]) != m->E) {
        PyErr_SetString(PyExc_ValueError, "layer: the MoE needs 1 <= top_k <= n_experts, expert_ff >= 1, "
                                          "shared_ff >= 0 and n_experts products in each of ups and downs");
        return -1;
    }
    *experts = malloc(sizeof(Product) * (size_t)(2 * m->E));
    if (*experts == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    m->up = *experts;
    m->down = *experts + m->E;
    for (int64_t i = 0; i < m->E; i++)
        if (product_from(PyTuple_GET_ITEM(e[6], i), NULL, up_width(activation, m->ff), d, "expert up", *experts + i) ||
            product_from(PyTuple_GET_ITEM(e[7], i), NULL, d, m->ff, "expert down", *experts + m->E + i))
            return -1;
    if (m->shared_ff > 0 && (product_from(e[9], e[10], up_width(activation, m->shared_ff), d, "shared up", &m->shared_up) ||
                             product_from(e[11], e[12], d, m->shared_ff, "shared down", &m->shared_down)))
        return -1;
    return 0;
}

static PyObject *py_layer(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t w[7], parallel, v[13];
    double f[3];
    if (nargs < 14 || nargs > 16 || !PyTuple_Check(args[0]) || PyTuple_GET_SIZE(args[0]) != 28) {
        PyErr_SetString(PyExc_TypeError, LAYER_SIGNATURE "; " LAYER_WEIGHTS "; " LAYER_MOE);
        return NULL;
    }
    PyObject *const *weights = &PyTuple_GET_ITEM(args[0], 0);
    int64_t qk_norms[2], norms[4], windowed[2], ring = 0;
    for (int i = 0; i < 3; i++) f[i] = PyFloat_AsDouble(weights[16 + i]);
    const double qk_eps = PyFloat_AsDouble(weights[21]);
    if (ints(weights, 7, w) || ints(weights + 15, 1, &parallel) || ints(weights + 19, 2, qk_norms) ||
        ints(weights + 22, 4, norms) || ints(weights + 26, 2, windowed) || ints(args + 1, 13, v) ||
        (nargs == 16 && ints(args + 15, 1, &ring)))
        return NULL;
    Layer L = {
        .d = w[0], .ff = w[1], .parallel_residual = (int)parallel, .activation = (int)norms[3],
        .attn_norm = {.weight = (const float *)(intptr_t)w[5], .bias = (const float *)(intptr_t)norms[1],
                      .eps = (float)f[0], .layer = norms[0] != 0},
        .mlp_norm = {.weight = (const float *)(intptr_t)w[6], .bias = (const float *)(intptr_t)norms[2],
                     .eps = (float)f[1], .layer = norms[0] != 0},
    };
    if (L.activation < SWIGLU || L.activation > GELU_TANH) {
        PyErr_SetString(PyExc_ValueError, "layer: activation must be 0 (SwiGLU), 1 (GELU) or 2 (GELU, tanh)");
        return NULL;
    }
    Attention a = {
        .B = v[2], .nq = w[2], .nkv = w[3], .hd = w[4], .q_factor = (float)f[2],
        .keys = (float *)(intptr_t)v[3], .values = (float *)(intptr_t)v[4], .slots = v[5], .length = v[6],
        .key_mask = (const uint8_t *)(intptr_t)v[7], .mask_stride = v[8],
        .cos = (const float *)(intptr_t)v[9], .sin = (const float *)(intptr_t)v[10], .rope_stride = v[11],
        .q_norm = (const float *)(intptr_t)qk_norms[0], .k_norm = (const float *)(intptr_t)qk_norms[1],
        .qk_eps = (float)qk_eps, .window = windowed[0], .dilation = windowed[1], .ring = ring != 0,
    };
    const int threads = (int)v[12];
    if (ROWS_INTO_HERE == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "layer: this CPU has neither AVX-512F nor AVX2 with FMA");
        return NULL;
    }
    if (a.B < 1 || a.B > MAX_ROWS || L.d < 1 || L.ff < 1 || a.nkv < 1 || a.nq % a.nkv || a.hd < 1 ||
        a.hd > MAX_HEAD_DIM || (a.cos && a.hd % 2) || a.length < 0 || (!a.ring && a.length >= a.slots) ||
        threads < 1 || a.window < 0 || (a.window > 0 && a.dilation < 1) ||
        (a.ring && (a.window == 0 || a.slots < (a.window - 1) * a.dilation + 1))) {
        PyErr_SetString(PyExc_ValueError, LAYER_SIGNATURE ": needs B 1 to 64, d and ff >= 1, n_q a multiple of "
                                          "n_kv >= 1, head_dim 1 to 512 (even with RoPE), 0 <= length < slots "
                                          "(a ring: slots at least the window's span), threads >= 1, and a window "
                                          "with dilation >= 1");
        return NULL;
    }
    const int64_t qkv_width = (a.nq + 2 * a.nkv) * a.hd;
    if (product_from(weights[7], weights[8], qkv_width, L.d, "qkv", &L.qkv) ||
        product_from(weights[9], weights[10], L.d, a.nq * a.hd, "out", &L.out))
        return NULL;
    MoE moe;
    Product *experts = NULL;
    if (nargs >= 15 && args[14] != Py_None) {
        if (moe_from(args[14], L.d, L.activation, &moe, &experts)) {
            free(experts);
            return NULL;
        }
        L.moe = &moe;
    } else if (product_from(weights[11], weights[12], up_width(L.activation, L.ff), L.d, "up", &L.up) ||
               product_from(weights[13], weights[14], L.d, L.ff, "down", &L.down)) {
        return NULL;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = run_layer(&L, (const float *)(intptr_t)v[0], (float *)(intptr_t)v[1], &a, threads);
    Py_END_ALLOW_THREADS
    free(experts);
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
     LAYER_SIGNATURE ": y (B, d) = one RMSNorm, dense-attention, SwiGLU (or SwiGLU-expert MoE) layer applied to x "
                     "(B, d), one new token per row (the cache as `attend` takes it); " LAYER_WEIGHTS "; " LAYER_MOE
                     " (up and down in weights unused then), each product's weights "
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
