/* weights.c — fold per-channel factors into a weight matrix and round it per output channel.
 *
 *   w'[i, j]  = w[i, j] * col[j] / row[i]         (col, row optional; two float32 roundings, in
 *                                                   this order, as the NumPy twin)
 *   scale[i]  = absmax_j |w'[i, j]| / qmax         (1 for an all-zero row)
 *   codes     = clamp(rint(w' / scale), -qmax, qmax)
 *   fake      = codes * scale                      (what the fake-quant model multiplies by)
 *
 * This is what sasq.transforms does for every matrix of a folded plan after each training step;
 * NumPy needs six passes and temporaries, this is two passes per row (the folded row stays in a
 * per-task scratch) on the thread pool. Same IEEE operations in the same order as the twin (no
 * FMA contraction in ISO C mode, no -ffast-math), so the results are bit-identical.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "sasq.h"

#define INLINE static inline __attribute__((always_inline))
#if defined(__x86_64__)
#define TARGET_AVX2 __attribute__((target("avx2")))
#define HAVE_AVX2_TIER 1
#else
#define HAVE_AVX2_TIER 0
#endif

/* One row: fold into tmp, absmax, then round; returns 1 if the row has a non-finite value. */
INLINE int fold_quant_row(const float *restrict w, int64_t cols, const float *restrict col,
                          float rdiv, int use_row, int bits, float *restrict tmp,
                          float *restrict fq, int8_t *restrict codes, float *restrict scale) {
    float amax = 0.0f;
    int bad = 0;
    for (int64_t j = 0; j < cols; j++) {
        float v = w[j];
        if (col) v = v * col[j];
        if (use_row) v = v / rdiv;
        tmp[j] = v;
        float a = fabsf(v);
        bad |= !(a <= FLT_MAX);
        amax = a > amax ? a : amax;
    }
    if (bits == 0) { /* fold only */
        for (int64_t j = 0; j < cols; j++) fq[j] = tmp[j];
        return bad;
    }
    const float qm = (float)sasq_qmax(bits);
    float s = amax > 0.0f ? amax / qm : 1.0f;
    if (scale) *scale = s;
    for (int64_t j = 0; j < cols; j++) {
        float u = rintf(tmp[j] / s);
        u = u < -qm ? -qm : (u > qm ? qm : u);
        if (fq) fq[j] = u * s;
        if (codes) codes[j] = (int8_t)(int)u;
    }
    return bad;
}

static int rows_scalar(const float *w, int64_t r0, int64_t r1, int64_t cols, const float *col,
                       const float *row, int bits, float *tmp, float *fq, int8_t *codes,
                       float *scale) {
    int bad = 0;
    for (int64_t i = r0; i < r1; i++)
        bad |= fold_quant_row(w + i * cols, cols, col, row ? row[i] : 1.0f, row != NULL, bits, tmp,
                              fq ? fq + i * cols : NULL, codes ? codes + i * cols : NULL,
                              scale ? scale + i : NULL);
    return bad;
}

#if HAVE_AVX2_TIER
TARGET_AVX2 static int rows_avx2(const float *w, int64_t r0, int64_t r1, int64_t cols,
                                 const float *col, const float *row, int bits, float *tmp,
                                 float *fq, int8_t *codes, float *scale) {
    int bad = 0;
    for (int64_t i = r0; i < r1; i++)
        bad |= fold_quant_row(w + i * cols, cols, col, row ? row[i] : 1.0f, row != NULL, bits, tmp,
                              fq ? fq + i * cols : NULL, codes ? codes + i * cols : NULL,
                              scale ? scale + i : NULL);
    return bad;
}
#endif

typedef struct {
    const float *w, *col, *row;
    int64_t rows, cols, rpc;
    int bits;
    float *fq, *scale;
    int8_t *codes;
    int bad, nomem;
} fq_job;

static void fq_task(void *vctx, int64_t t) {
    fq_job *J = vctx;
    int64_t r0 = t * J->rpc, r1 = r0 + J->rpc < J->rows ? r0 + J->rpc : J->rows;
    float *tmp = malloc((size_t)J->cols * sizeof(float));
    if (!tmp) {
        __atomic_store_n(&J->nomem, 1, __ATOMIC_RELAXED);
        return;
    }
    int bad;
#if HAVE_AVX2_TIER
    if (sasq_get_isa() >= SASQ_ISA_AVX2)
        bad = rows_avx2(J->w, r0, r1, J->cols, J->col, J->row, J->bits, tmp, J->fq, J->codes, J->scale);
    else
#endif
        bad = rows_scalar(J->w, r0, r1, J->cols, J->col, J->row, J->bits, tmp, J->fq, J->codes, J->scale);
    free(tmp);
    if (bad) __atomic_store_n(&J->bad, 1, __ATOMIC_RELAXED);
}

sasq_status sasq_fold_quant_weight(const float *w, int64_t rows, int64_t cols, const float *col,
                                   const float *row, int bits, float *fq, int8_t *codes,
                                   float *scale) {
    if (rows <= 0 || cols <= 0 || (bits != 0 && (bits < 2 || bits > 8))) return SASQ_ERR_ARG;
    if (bits == 0 && !fq) return SASQ_ERR_ARG;
    fq_job J = {w, col, row, rows, cols, sasq_chunk_rows(rows, cols), bits, fq, scale, codes, 0, 0};
    sasq_parallel_for((rows + J.rpc - 1) / J.rpc, fq_task, &J);
    if (J.nomem) return SASQ_ERR_NOMEM;
    return J.bad ? SASQ_ERR_NONFINITE : SASQ_OK;
}
