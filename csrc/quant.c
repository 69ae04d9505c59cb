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

sasq_status sasq_quantize(const float *x, const float *scale, int64_t s_stride, int64_t rows,
                          int64_t cols, int bits, int8_t *q) {
    int bad;
#if HAVE_AVX2_TIER
    if (sasq_get_isa() >= SASQ_ISA_AVX2)
        bad = quantize_avx2(x, scale, s_stride, rows, cols, bits, q);
    else
#endif
        bad = quantize_scalar(x, scale, s_stride, rows, cols, bits, q);
    return bad ? SASQ_ERR_NONFINITE : SASQ_OK;
}

/* ---- dequantize ---- */
void sasq_dequantize(const int8_t *q, const float *scale, int64_t s_stride, int64_t rows,
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

void sasq_fake_quant(const float *x, const float *scale, int64_t s_stride, int64_t rows,
                     int64_t cols, int bits, float *y) {
#if HAVE_AVX2_TIER
    if (sasq_get_isa() >= SASQ_ISA_AVX2) {
        fake_quant_avx2(x, scale, s_stride, rows, cols, bits, y);
        return;
    }
#endif
    fake_quant_scalar(x, scale, s_stride, rows, cols, bits, y);
}
