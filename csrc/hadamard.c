/* hadamard.c — orthonormal Hadamard transform over the last axis (QuaRot's online rotation), and
 * the same transform fused with quantize / fake_quant for inference.
 *
 * Layout: a row has n = m * p elements, p = 2^k, index i = a * p + b (a < m, b < p), and
 *     H = kron(S, H_p):  H[a p + b, a' p + b'] = S[a, a'] * H_p[b, b'],
 * S the (m, m) float32 matrix passed in (a +-1 Hadamard matrix from sasq.hadamard for an
 * orthonormal transform; any values work, the kernel stays generic), H_p Sylvester
 * (H_p[b, b'] = (-1)^popcount(b & b'), symmetric). Per row, with X[a', b'] = x[a' p + b']:
 *     transpose = 0:  y = x H^T / sqrt(n),  Y = S   X H_p / sqrt(n)
 *     transpose = 1:  y = x H   / sqrt(n),  Y = S^T X H_p / sqrt(n)
 * computed as t = FWHT of each length-p segment (butterflies, stages h = 1, 2, .., p/2, in
 * place), then y[a p + b] = (sum_{a'} S[a, a'] t[a' p + b]) * (1 / sqrt(n)) for the m part.
 *
 * Arithmetic order, identical in every tier so the tiers agree bit for bit: each butterfly is
 * (u + v, u - v) in float32; the m-sum starts at S[a, 0] * t[b] and adds S[a, a'] * t[a' p + b]
 * for a' = 1 .. m-1 in order (a product and an add, never an FMA: no -ffast-math, no contraction
 * under -std=c11, separate statements in the scalar code); the result is multiplied once by
 * float32(1 / sqrt(n)). SIMD tiers: AVX2 (8 lanes) and AVX-512F (16 lanes) do the butterfly
 * stages h < lanes inside registers (permute + blend) and the larger ones across vectors, and
 * the m-sum over b in register tiles (rows of S x vectors of b); short segments (p < lanes) fall
 * back to the scalar m-sum, and a scalar tail finishes every SIMD loop.
 * Rows are independent, cut into fixed chunks on the pool (results do not depend on the thread
 * count); each chunk allocates its own scratch (n floats for the m-sum, n more for the fused
 * kernels). x may be y (in place). NaN/inf in a row spread over that row's outputs.
 * Measured on one shared Zen 4 core (benchmarks/bench_hadamard.py, 256 rows): 0.55 us/row at
 * n = 576 (36 * 16), 0.95 at 1536 (12 * 128), 3.8 at 4096; 100-150 at 11008 = 344 * 32, where the
 * m-sum's m * n = 3.8M products and adds per row are nearly the whole cost (tiles of 4 or 8 rows
 * of S measured the same: not latency bound).
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sasq.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#define TARGET_AVX2 __attribute__((target("avx2")))
#define TARGET_AVX512 __attribute__((target("avx512f")))
#else
#define HAVE_X86 0
#endif
#define INLINE static inline __attribute__((always_inline))

typedef void (*fwht_fn)(float *t, int64_t n, int64_t p);
typedef void (*mix_fn)(const float *t, const float *s, int64_t m, int64_t p, float inv, float *y);

/* ---------------------------------------------------------------- scalar tier (the reference) */

/* Butterfly stages h = 1 .. hmax/2 over t[0, n): blocks of 2h never cross a segment (n, p powers
 * of two times m, 2h <= p). */
static void fwht_stages_scalar(float *restrict t, int64_t n, int64_t hmax) {
    for (int64_t h = 1; h < hmax; h *= 2)
        for (int64_t i = 0; i < n; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                float u = t[j], v = t[j + h];
                t[j] = u + v;
                t[j + h] = u - v;
            }
}

static void fwht_scalar(float *t, int64_t n, int64_t p) { fwht_stages_scalar(t, n, p); }

/* y[a p + b] = (S[a, 0] t[b] + S[a, 1] t[p + b] + ...) * inv, the sum in a' order. */
static void mix_scalar(const float *restrict t, const float *restrict s, int64_t m, int64_t p,
                       float inv, float *restrict y) {
    for (int64_t a = 0; a < m; a++) {
        const float *sa = s + a * m;
        float *ya = y + a * p;
        for (int64_t b = 0; b < p; b++) ya[b] = sa[0] * t[b];
        for (int64_t c = 1; c < m; c++) {
            const float *tc = t + c * p;
            for (int64_t b = 0; b < p; b++) {
                float prod = sa[c] * tc[b]; /* own statement: never contracted into an FMA */
                ya[b] = ya[b] + prod;
            }
        }
        for (int64_t b = 0; b < p; b++) ya[b] = ya[b] * inv;
    }
}

/* ---------------------------------------------------------------- AVX2 tier */
#if HAVE_X86

/* Stages h = 1, 2, 4 (those below hmax) inside one 8-lane vector: lanes with bit h clear get
 * u + v (u their own value, v the partner's), lanes with it set get u - v = partner - own. */
TARGET_AVX2 INLINE __m256 stages8(__m256 v, int64_t hmax) {
    __m256 q;
    if (hmax > 1) {
        q = _mm256_permute_ps(v, 0xB1);
        v = _mm256_blend_ps(_mm256_add_ps(v, q), _mm256_sub_ps(q, v), 0xAA);
    }
    if (hmax > 2) {
        q = _mm256_permute_ps(v, 0x4E);
        v = _mm256_blend_ps(_mm256_add_ps(v, q), _mm256_sub_ps(q, v), 0xCC);
    }
    if (hmax > 4) {
        q = _mm256_permute2f128_ps(v, v, 0x01);
        v = _mm256_blend_ps(_mm256_add_ps(v, q), _mm256_sub_ps(q, v), 0xF0);
    }
    return v;
}

TARGET_AVX2 static void fwht_avx2(float *t, int64_t n, int64_t p) {
    int64_t hs = p < 8 ? p : 8, i = 0; /* stages h < hs in registers */
    if (hs > 1) {
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(t + i, stages8(_mm256_loadu_ps(t + i), hs));
        fwht_stages_scalar(t + i, n - i, hs); /* tail: whole segments (p < 8 here) */
    }
    for (int64_t h = 8; h < p; h *= 2)
        for (i = 0; i < n; i += 2 * h)
            for (int64_t j = i; j < i + h; j += 8) {
                __m256 u = _mm256_loadu_ps(t + j), v = _mm256_loadu_ps(t + j + h);
                _mm256_storeu_ps(t + j, _mm256_add_ps(u, v));
                _mm256_storeu_ps(t + j + h, _mm256_sub_ps(u, v));
            }
}

/* Rows a0 .. a0+RA-1 of y, columns b0 .. b0 + 8 NV - 1: RA * NV accumulators in registers. */
TARGET_AVX2 INLINE void mix_tile8(const float *t, const float *s, int64_t m, int64_t p, int64_t a0,
                                  int64_t b0, const int RA, const int NV, __m256 vinv, float *y) {
    __m256 acc[2][4], tv[4];
    for (int v = 0; v < NV; v++) tv[v] = _mm256_loadu_ps(t + b0 + 8 * v);
    for (int r = 0; r < RA; r++) {
        __m256 w = _mm256_set1_ps(s[(a0 + r) * m]);
        for (int v = 0; v < NV; v++) acc[r][v] = _mm256_mul_ps(w, tv[v]);
    }
    for (int64_t c = 1; c < m; c++) {
        for (int v = 0; v < NV; v++) tv[v] = _mm256_loadu_ps(t + c * p + b0 + 8 * v);
        for (int r = 0; r < RA; r++) {
            __m256 w = _mm256_set1_ps(s[(a0 + r) * m + c]);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_mul_ps(w, tv[v]));
        }
    }
    for (int r = 0; r < RA; r++)
        for (int v = 0; v < NV; v++)
            _mm256_storeu_ps(y + (a0 + r) * p + b0 + 8 * v, _mm256_mul_ps(acc[r][v], vinv));
}

#define MIX_COLUMNS(TILE, W, RA, NV)                                                             \
    do {                                                                                         \
        for (int64_t b0 = 0; b0 < p; b0 += (W) * (NV)) {                                         \
            int64_t a = 0;                                                                       \
            for (; a + (RA) <= m; a += (RA)) TILE(t, s, m, p, a, b0, RA, NV, vinv, y);           \
            for (; a < m; a++) TILE(t, s, m, p, a, b0, 1, NV, vinv, y); /* tail rows of S */     \
        }                                                                                        \
    } while (0)

TARGET_AVX2 static void mix_avx2(const float *t, const float *s, int64_t m, int64_t p, float inv,
                                 float *y) {
    const __m256 vinv = _mm256_set1_ps(inv);
    if (p >= 32) MIX_COLUMNS(mix_tile8, 8, 2, 4); /* p is a power of two: no column tail */
    else if (p == 16) MIX_COLUMNS(mix_tile8, 8, 2, 2);
    else if (p == 8) MIX_COLUMNS(mix_tile8, 8, 2, 1);
    else mix_scalar(t, s, m, p, inv, y); /* segments shorter than a vector */
}

/* ---------------------------------------------------------------- AVX-512 tier */

TARGET_AVX512 INLINE __m512 stages16(__m512 v, int64_t hmax) {
    __m512 q;
    if (hmax > 1) {
        q = _mm512_permute_ps(v, 0xB1);
        v = _mm512_mask_blend_ps(0xAAAA, _mm512_add_ps(v, q), _mm512_sub_ps(q, v));
    }
    if (hmax > 2) {
        q = _mm512_permute_ps(v, 0x4E);
        v = _mm512_mask_blend_ps(0xCCCC, _mm512_add_ps(v, q), _mm512_sub_ps(q, v));
    }
    if (hmax > 4) {
        q = _mm512_shuffle_f32x4(v, v, 0xB1);
        v = _mm512_mask_blend_ps(0xF0F0, _mm512_add_ps(v, q), _mm512_sub_ps(q, v));
    }
    if (hmax > 8) {
        q = _mm512_shuffle_f32x4(v, v, 0x4E);
        v = _mm512_mask_blend_ps(0xFF00, _mm512_add_ps(v, q), _mm512_sub_ps(q, v));
    }
    return v;
}

TARGET_AVX512 static void fwht_avx512(float *t, int64_t n, int64_t p) {
    int64_t hs = p < 16 ? p : 16, i = 0;
    if (hs > 1) {
        for (; i + 16 <= n; i += 16) _mm512_storeu_ps(t + i, stages16(_mm512_loadu_ps(t + i), hs));
        fwht_stages_scalar(t + i, n - i, hs);
    }
    for (int64_t h = 16; h < p; h *= 2)
        for (i = 0; i < n; i += 2 * h)
            for (int64_t j = i; j < i + h; j += 16) {
                __m512 u = _mm512_loadu_ps(t + j), v = _mm512_loadu_ps(t + j + h);
                _mm512_storeu_ps(t + j, _mm512_add_ps(u, v));
                _mm512_storeu_ps(t + j + h, _mm512_sub_ps(u, v));
            }
}

TARGET_AVX512 INLINE void mix_tile16(const float *t, const float *s, int64_t m, int64_t p,
                                     int64_t a0, int64_t b0, const int RA, const int NV,
                                     __m512 vinv, float *y) {
    __m512 acc[4][4], tv[4];
    for (int v = 0; v < NV; v++) tv[v] = _mm512_loadu_ps(t + b0 + 16 * v);
    for (int r = 0; r < RA; r++) {
        __m512 w = _mm512_set1_ps(s[(a0 + r) * m]);
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_mul_ps(w, tv[v]);
    }
    for (int64_t c = 1; c < m; c++) {
        for (int v = 0; v < NV; v++) tv[v] = _mm512_loadu_ps(t + c * p + b0 + 16 * v);
        for (int r = 0; r < RA; r++) {
            __m512 w = _mm512_set1_ps(s[(a0 + r) * m + c]);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_mul_ps(w, tv[v]));
        }
    }
    for (int r = 0; r < RA; r++)
        for (int v = 0; v < NV; v++)
            _mm512_storeu_ps(y + (a0 + r) * p + b0 + 16 * v, _mm512_mul_ps(acc[r][v], vinv));
}

TARGET_AVX512 static void mix_avx512(const float *t, const float *s, int64_t m, int64_t p,
                                     float inv, float *y) {
    const __m512 vinv = _mm512_set1_ps(inv);
    if (p >= 64) MIX_COLUMNS(mix_tile16, 16, 4, 4); /* 16 accumulators: the latency of the adds hides */
    else if (p == 32) MIX_COLUMNS(mix_tile16, 16, 4, 2);
    else if (p == 16) MIX_COLUMNS(mix_tile16, 16, 4, 1);
    else mix_avx2(t, s, m, p, inv, y);
}
#endif /* HAVE_X86 */

/* ---------------------------------------------------------------- rows on the pool */

typedef struct {
    int op; /* 0 transform (float y), 1 quantize (int8 q), 2 fake_quant (float y) */
    const float *x;
    void *out;
    const float *s; /* (m, m), already transposed when transpose = 1 */
    int64_t m, p, n, rows, rpc;
    float inv;
    const float *scale;
    int64_t ss;
    int bits;
    fwht_fn fwht;
    mix_fn mix;
    int bad; /* 1: non-finite value to quantize, 2: no memory */
} hd_job;

/* One row: y = transform(x); y may be x when m == 1 (t unused), t: n floats when m > 1. */
static void transform_row(const hd_job *J, const float *x, float *t, float *y) {
    if (J->m == 1) {
        if (y != x) memcpy(y, x, (size_t)J->n * sizeof(float));
        J->fwht(y, J->n, J->p);
        const float s0 = J->s[0]; /* as in the m-sum: (S[0, 0] t[b]) * inv */
        for (int64_t i = 0; i < J->n; i++) {
            float v = s0 * y[i];
            y[i] = v * J->inv;
        }
        return;
    }
    memcpy(t, x, (size_t)J->n * sizeof(float));
    J->fwht(t, J->n, J->p);
    J->mix(t, J->s, J->m, J->p, J->inv, y);
}

static void hd_task(void *vctx, int64_t k) {
    hd_job *J = vctx;
    int64_t r0 = k * J->rpc, nr = J->rows - r0 < J->rpc ? J->rows - r0 : J->rpc, n = J->n;
    size_t nbuf = (size_t)((J->m > 1) + (J->op != 0)) * (size_t)n;
    float *buf = nbuf ? malloc(nbuf * sizeof(float)) : NULL;
    if (nbuf && !buf) {
        __atomic_store_n(&J->bad, 2, __ATOMIC_RELAXED);
        return;
    }
    float *t = J->m > 1 ? buf : NULL, *row = J->op ? buf + (nbuf - (size_t)n) : NULL;
    for (int64_t r = r0; r < r0 + nr; r++) {
        const float *xr = J->x + r * n;
        if (J->op == 0) {
            transform_row(J, xr, t, (float *)J->out + r * n);
            continue;
        }
        transform_row(J, xr, t, row);
        /* one row through the very kernels of quant.c (a single task runs inline), so the fused
         * result is quantize(hadamard(x)) bit for bit */
        if (J->op == 1) {
            if (sasq_quantize(row, J->scale, J->ss, 1, n, J->bits, (int8_t *)J->out + r * n))
                __atomic_store_n(&J->bad, 1, __ATOMIC_RELAXED);
        } else {
            sasq_fake_quant(row, J->scale, J->ss, 1, n, J->bits, (float *)J->out + r * n);
        }
    }
    free(buf);
}

static sasq_status hd_run(hd_job *J, const float *small, int transpose) {
    int64_t n = J->n, m = J->m;
    if (m < 1 || n < 1 || J->rows < 0 || n % m) return SASQ_ERR_ARG;
    J->p = n / m;
    if (J->p & (J->p - 1)) return SASQ_ERR_ARG; /* p must be a power of two */
    if (J->rows == 0) return SASQ_OK;
    J->inv = (float)(1.0 / sqrt((double)n));
    J->fwht = fwht_scalar;
    J->mix = mix_scalar;
#if HAVE_X86
    sasq_isa isa = sasq_get_isa();
    if (isa >= SASQ_ISA_AVX512VNNI) {
        J->fwht = fwht_avx512;
        J->mix = mix_avx512;
    } else if (isa >= SASQ_ISA_AVX2) {
        J->fwht = fwht_avx2;
        J->mix = mix_avx2;
    }
#endif
    float *st = NULL;
    J->s = small;
    if (transpose && m > 1) { /* S^T once, so the m-sum reads rows of S in every tier */
        st = malloc((size_t)(m * m) * sizeof(float));
        if (!st) return SASQ_ERR_NOMEM;
        for (int64_t a = 0; a < m; a++)
            for (int64_t c = 0; c < m; c++) st[a * m + c] = small[c * m + a];
        J->s = st;
    }
    J->rpc = sasq_chunk_rows(J->rows, n);
    sasq_parallel_for((J->rows + J->rpc - 1) / J->rpc, hd_task, J);
    free(st);
    return J->bad == 2 ? SASQ_ERR_NOMEM : J->bad == 1 ? SASQ_ERR_NONFINITE : SASQ_OK;
}

sasq_status sasq_hadamard(const float *x, int64_t rows, int64_t n, const float *small, int64_t m,
                          int transpose, float *y) {
    hd_job J = {.op = 0, .x = x, .out = y, .m = m, .n = n, .rows = rows};
    return hd_run(&J, small, transpose);
}

sasq_status sasq_hadamard_quantize(const float *x, int64_t rows, int64_t n, const float *small,
                                   int64_t m, int transpose, const float *scale, int64_t s_stride,
                                   int bits, int8_t *q) {
    hd_job J = {.op = 1, .x = x, .out = q, .m = m, .n = n, .rows = rows, .scale = scale,
                .ss = s_stride, .bits = bits};
    return hd_run(&J, small, transpose);
}

sasq_status sasq_hadamard_fake_quant(const float *x, int64_t rows, int64_t n, const float *small,
                                     int64_t m, int transpose, const float *scale,
                                     int64_t s_stride, int bits, float *y) {
    const float qm = (float)sasq_qmax(bits);
    for (int64_t j = 0; j < (s_stride ? n : 1); j++) /* the grid's ends must be finite */
        if (!sasq_grid_top_ok(scale[j * s_stride], qm)) return SASQ_ERR_ARG;
    hd_job J = {.op = 2, .x = x, .out = y, .m = m, .n = n, .rows = rows, .scale = scale,
                .ss = s_stride, .bits = bits};
    return hd_run(&J, small, transpose);
}
