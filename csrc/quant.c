/* quant.c — symmetric quantize / dequantize / fake-quant (forward only; the STE is in ste.c).
 *
 * Each kernel body is written once as an always-inline scalar loop and instantiated twice: a
 * baseline (SSE2) tier and an AVX2 tier that the compiler vectorises (vroundps, vdivps). Both do
 * the same IEEE operations in the same order (no -ffast-math, no FMA contraction), so the tiers
 * agree bit for bit; the tier follows sasq_get_isa().
 */
#include <float.h>
#include <math.h>

#include "sasq.h"

#define INLINE static inline __attribute__((always_inline))
#if defined(__x86_64__)
#define TARGET_AVX2 __attribute__((target("avx2")))
#define HAVE_AVX2_TIER 1
#else
#define TARGET_AVX2
#define HAVE_AVX2_TIER 0
#endif

/* clamp that keeps NaN (comparisons with NaN are false) */
INLINE float clampq(float r, float qm) {
    r = r < -qm ? -qm : r;
    return r > qm ? qm : r;
}

/* ---- quantize ---- */
INLINE int quantize_body(const float *restrict x, const float *restrict s, int64_t ss,
                         int64_t rows, int64_t cols, int bits, int8_t *restrict q) {
    const float qm = (float)sasq_qmax(bits);
    int bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        int8_t *qr = q + r * cols;
        for (int64_t c = 0; c < cols; c++) {
            float v = xr[c];
            bad |= !(fabsf(v) <= FLT_MAX); /* NaN or inf */
            float u = clampq(rintf(v / s[c * ss]), qm);
            qr[c] = (int8_t)(int)(u == u ? u : 0.0f); /* NaN never reaches the cast */
        }
    }
    return bad;
}
static int quantize_scalar(const float *x, const float *s, int64_t ss, int64_t rows, int64_t cols,
                           int bits, int8_t *q) {
    return ss ? quantize_body(x, s, 1, rows, cols, bits, q)
              : quantize_body(x, s, 0, rows, cols, bits, q);
}
#if HAVE_AVX2_TIER
TARGET_AVX2 static int quantize_avx2(const float *x, const float *s, int64_t ss, int64_t rows,
                                     int64_t cols, int bits, int8_t *q) {
    return ss ? quantize_body(x, s, 1, rows, cols, bits, q)
              : quantize_body(x, s, 0, rows, cols, bits, q);
}
#endif

static int quantize_rows(const float *x, const float *scale, int64_t s_stride, int64_t rows,
                         int64_t cols, int bits, int8_t *q) {
#if HAVE_AVX2_TIER
    if (sasq_get_isa() >= SASQ_ISA_AVX2) return quantize_avx2(x, scale, s_stride, rows, cols, bits, q);
#endif
    return quantize_scalar(x, scale, s_stride, rows, cols, bits, q);
}

/* ---- dequantize ---- */
static void dequantize_rows(const int8_t *q, const float *scale, int64_t s_stride, int64_t rows,
                            int64_t cols, float *x) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            x[r * cols + c] = (float)q[r * cols + c] * scale[c * s_stride];
}

/* ---- fake quant ---- */
INLINE void fake_quant_body(const float *restrict x, const float *restrict s, int64_t ss,
                            int64_t rows, int64_t cols, int bits, float *restrict y) {
    const float qm = (float)sasq_qmax(bits);
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float *yr = y + r * cols;
        for (int64_t c = 0; c < cols; c++) {
            float sc = s[c * ss];
            yr[c] = sc * clampq(rintf(xr[c] / sc), qm);
        }
    }
}
static void fake_quant_scalar(const float *x, const float *s, int64_t ss, int64_t rows,
                              int64_t cols, int bits, float *y) {
    if (ss) fake_quant_body(x, s, 1, rows, cols, bits, y);
    else fake_quant_body(x, s, 0, rows, cols, bits, y);
}
#if HAVE_AVX2_TIER
TARGET_AVX2 static void fake_quant_avx2(const float *x, const float *s, int64_t ss, int64_t rows,
                                        int64_t cols, int bits, float *y) {
    if (ss) fake_quant_body(x, s, 1, rows, cols, bits, y);
    else fake_quant_body(x, s, 0, rows, cols, bits, y);
}
#endif

static void fake_quant_rows(const float *x, const float *scale, int64_t s_stride, int64_t rows,
                            int64_t cols, int bits, float *y) {
#if HAVE_AVX2_TIER
    if (sasq_get_isa() >= SASQ_ISA_AVX2) {
        fake_quant_avx2(x, scale, s_stride, rows, cols, bits, y);
        return;
    }
#endif
    fake_quant_scalar(x, scale, s_stride, rows, cols, bits, y);
}

/* ---- row chunks on the thread pool ---- */
typedef struct {
    int op; /* 0 quantize, 1 dequantize, 2 fake_quant */
    const void *in;
    const float *s;
    int64_t ss, rows, cols, rpc;
    int bits;
    void *out;
    int bad;
} ew_job;

static void ew_task(void *vctx, int64_t t) {
    ew_job *J = vctx;
    int64_t r0 = t * J->rpc, nr = J->rows - r0 < J->rpc ? J->rows - r0 : J->rpc, off = r0 * J->cols;
    if (J->op == 0) {
        if (quantize_rows((const float *)J->in + off, J->s, J->ss, nr, J->cols, J->bits,
                          (int8_t *)J->out + off))
            __atomic_store_n(&J->bad, 1, __ATOMIC_RELAXED);
    } else if (J->op == 1) {
        dequantize_rows((const int8_t *)J->in + off, J->s, J->ss, nr, J->cols, (float *)J->out + off);
    } else {
        fake_quant_rows((const float *)J->in + off, J->s, J->ss, nr, J->cols, J->bits,
                        (float *)J->out + off);
    }
}

static int ew_run(int op, const void *in, const float *s, int64_t ss, int64_t rows, int64_t cols,
                  int bits, void *out) {
    ew_job J = {op, in, s, ss, rows, cols, sasq_chunk_rows(rows, cols), bits, out, 0};
    sasq_parallel_for((rows + J.rpc - 1) / J.rpc, ew_task, &J);
    return J.bad;
}

sasq_status sasq_quantize(const float *x, const float *scale, int64_t s_stride, int64_t rows,
                          int64_t cols, int bits, int8_t *q) {
    return ew_run(0, x, scale, s_stride, rows, cols, bits, q) ? SASQ_ERR_NONFINITE : SASQ_OK;
}

void sasq_dequantize(const int8_t *q, const float *scale, int64_t s_stride, int64_t rows,
                     int64_t cols, float *x) {
    ew_run(1, q, scale, s_stride, rows, cols, 8, x);
}

void sasq_fake_quant(const float *x, const float *scale, int64_t s_stride, int64_t rows,
                     int64_t cols, int bits, float *y) {
    ew_run(2, x, scale, s_stride, rows, cols, bits, y);
}

/* ---- dynamic per-row (per-token) quantization: the scale is computed here, at run time ----
 * s_row = (clip * absmax(row)) / qmax (absmax alone when clip == 1; 1 for an all-zero row), the
 * float32 operations of sasq.sites.DynamicQuant; q = clamp(rint(x / s_row)). */
typedef struct {
    const float *x;
    int64_t rows, cols, rpc;
    int bits;
    float clip;
    int8_t *q;
    float *s;
    int bad;
} dyn_job;

static void dyn_task(void *vctx, int64_t t) {
    dyn_job *J = vctx;
    const float qm = (float)sasq_qmax(J->bits);
    int64_t r0 = t * J->rpc, r1 = r0 + J->rpc < J->rows ? r0 + J->rpc : J->rows;
    int bad = 0;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = J->x + r * J->cols;
        float amax = 0.0f;
        for (int64_t c = 0; c < J->cols; c++) {
            float a = fabsf(xr[c]);
            bad |= !(a <= FLT_MAX);
            amax = a > amax ? a : amax;
        }
        float sc = (J->clip == 1.0f ? amax : amax * J->clip) / qm;
        sc = sc > 0.0f ? sc : 1.0f;
        J->s[r] = sc;
        int8_t *qr = J->q + r * J->cols;
        for (int64_t c = 0; c < J->cols; c++) {
            float u = clampq(rintf(xr[c] / sc), qm);
            qr[c] = (int8_t)(int)(u == u ? u : 0.0f);
        }
    }
    if (bad) __atomic_store_n(&J->bad, 1, __ATOMIC_RELAXED);
}

sasq_status sasq_quantize_dynamic(const float *x, int64_t rows, int64_t cols, int bits, float clip,
                                  int8_t *q, float *scales) {
    if (rows <= 0 || cols <= 0 || bits < 2 || bits > 8 || !(clip > 0.0f && clip <= 1.0f))
        return SASQ_ERR_ARG;
    dyn_job J = {x, rows, cols, sasq_chunk_rows(rows, cols), bits, clip, q, scales, 0};
    sasq_parallel_for((rows + J.rpc - 1) / J.rpc, dyn_task, &J);
    return J.bad ? SASQ_ERR_NONFINITE : SASQ_OK;
}
