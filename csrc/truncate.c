/* truncate.c — adaptive outlier truncation ("soft knee"), its backward, and a fused
 * truncate + quantize for inference.
 *
 *   |x| <= t : y = x
 *   |x| >  t : y = sign(x) * (t + (c - t) * tanh(z)),   z = (|x| - t) / (c - t),   0 < t < c
 *
 * Why this function: identity on the bulk (|x| <= t), monotone, continuous with a continuous
 * first derivative at the knee (slope 1 = sech^2(0)), and |y| < c for finite x (far outliers
 * may round to c in float32, never beyond), so the quantizer's clamp at c = s * qmax never bites
 * and outliers keep distinct, ordered codes until they saturate. Gradients (a = |x|, g = upstream gradient, zero inside the knee):
 *   dy/dx = sech^2(z)
 *   dy/dt = sign(x) * (1 - tanh z + (z - 1) sech^2 z)
 *   dy/dc = sign(x) * (tanh z - z sech^2 z)
 * Arithmetic is in double (tanh and sech^2 from one exp(-2z)) and rounded once to float; with
 * e = exp(-2z), 1 - tanh z is computed as 2e / (1 + e), since 1 - (1 - e)/(1 + e) cancels to 0
 * once e < 2^-53 (z > 18.4) and lost relative precision well before (a 2.6 % error at z = 20). z is
 * capped at 30 (tanh(30) == 1 in double) so that x = +-inf gives y = +-c with finite gradients
 * instead of inf * 0. NaN in x propagates to y and to all three gradients.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "sasq.h"

#define Z_CAP 30.0

static inline double knee_z(double a, double t, double c) {
    double z = (a - t) / (c - t);
    return z > Z_CAP ? Z_CAP : z; /* keeps NaN */
}

static inline float truncate1(float xf, float tf, float cf) {
    double a = fabs((double)xf), t = tf, c = cf;
    if (a <= t) return xf;
    double e = exp(-2.0 * knee_z(a, t, c)); /* tanh z = (1 - e) / (1 + e): one exp, as in backward */
    double y = t + (c - t) * ((1.0 - e) / (1.0 + e));
    return (float)(xf < 0 ? -y : y);
}

/* One chunk of rows of each kernel (the public functions below run chunks on the pool). */
static void truncate_rows(const float *restrict x, const float *restrict t, int64_t t_stride,
                          const float *restrict c, int64_t c_stride, int64_t rows, int64_t cols,
                          float *restrict y) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < cols; j++)
            y[r * cols + j] = truncate1(x[r * cols + j], t[j * t_stride], c[j * c_stride]);
}

/* acc_t (nt) and acc_c (nc): this chunk's sums, zeroed by the caller. */
static void backward_rows(const float *restrict x, const float *restrict t, int64_t t_stride,
                          const float *restrict c, int64_t c_stride,
                          const float *restrict grad_out, int64_t rows, int64_t cols,
                          float *restrict grad_x, double *restrict acc_t, double *restrict acc_c) {
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = 0; j < cols; j++) {
            int64_t i = r * cols + j;
            double xv = x[i], a = fabs(xv), tv = t[j * t_stride], cv = c[j * c_stride];
            double g = grad_out[i];
            if (a <= tv) {
                grad_x[i] = (float)g;
                continue;
            }
            /* one exp for both: tanh z = (1 - e) / (1 + e), sech^2 z = 4 e / (1 + e)^2, e = exp(-2z) */
            double z = knee_z(a, tv, cv), e = exp(-2.0 * z), ip = 1.0 / (1.0 + e);
            double th = (1.0 - e) * ip, s2 = 4.0 * e * ip * ip;
            double om = 2.0 * e * ip; /* 1 - tanh z without cancelling when tanh z ~ 1 */
            double sg = xv < 0 ? -1.0 : 1.0;
            if (xv != xv) sg = NAN;
            grad_x[i] = (float)(g * s2);
            acc_t[j * t_stride] += g * sg * (om + (z - 1.0) * s2);
            acc_c[j * c_stride] += g * sg * (th - z * s2);
        }
    }
}

static int quantize_rows(const float *restrict x, const float *restrict t, int64_t t_stride,
                         const float *restrict scale, int64_t s_stride, int64_t rows,
                         int64_t cols, int bits, int8_t *restrict q) {
    const float qm = (float)sasq_qmax(bits);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = 0; j < cols; j++) {
            int64_t i = r * cols + j;
            float v = x[i], s = scale[j * s_stride];
            if (!(fabsf(v) <= FLT_MAX)) return 1;
            float y = truncate1(v, t[j * t_stride], s * qm);
            float u = rintf(y / s);
            u = u < -qm ? -qm : (u > qm ? qm : u);
            q[i] = (int8_t)(int)(u == u ? u : 0.0f); /* NaN never reaches the cast */
        }
    }
    return 0;
}

typedef struct {
    int op; /* 0 truncate, 1 backward, 2 truncate_quantize */
    const float *x, *t, *c, *g; /* c: ceiling, or the scale for truncate_quantize */
    int64_t ts, cs, rows, cols, rpc, nt, nc;
    int bits;
    void *out;
    double *partial; /* backward: (chunks, nt + nc) */
    int bad;
} tr_job;

static void tr_task(void *vctx, int64_t k) {
    tr_job *J = vctx;
    int64_t r0 = k * J->rpc, nr = J->rows - r0 < J->rpc ? J->rows - r0 : J->rpc, off = r0 * J->cols;
    if (J->op == 0) {
        truncate_rows(J->x + off, J->t, J->ts, J->c, J->cs, nr, J->cols, (float *)J->out + off);
    } else if (J->op == 1) {
        double *p = J->partial + k * (J->nt + J->nc);
        backward_rows(J->x + off, J->t, J->ts, J->c, J->cs, J->g + off, nr, J->cols,
                      (float *)J->out + off, p, p + J->nt);
    } else if (quantize_rows(J->x + off, J->t, J->ts, J->c, J->cs, nr, J->cols, J->bits,
                             (int8_t *)J->out + off)) {
        __atomic_store_n(&J->bad, 1, __ATOMIC_RELAXED);
    }
}

static int64_t tr_chunks(tr_job *J) {
    J->rpc = sasq_chunk_rows(J->rows, J->cols);
    return (J->rows + J->rpc - 1) / J->rpc;
}

void sasq_truncate(const float *restrict x, const float *restrict t, int64_t t_stride,
                   const float *restrict c, int64_t c_stride, int64_t rows, int64_t cols,
                   float *restrict y) {
    tr_job J = {.op = 0, .x = x, .t = t, .c = c, .ts = t_stride, .cs = c_stride, .rows = rows,
                .cols = cols, .out = y};
    sasq_parallel_for(tr_chunks(&J), tr_task, &J);
}

sasq_status sasq_truncate_backward(const float *restrict x, const float *restrict t,
                                   int64_t t_stride, const float *restrict c, int64_t c_stride,
                                   const float *restrict grad_out, int64_t rows, int64_t cols,
                                   float *restrict grad_x, float *restrict grad_t,
                                   float *restrict grad_c) {
    tr_job J = {.op = 1, .x = x, .t = t, .c = c, .g = grad_out, .ts = t_stride, .cs = c_stride,
                .rows = rows, .cols = cols, .nt = t_stride ? cols : 1, .nc = c_stride ? cols : 1,
                .out = grad_x};
    int64_t chunks = tr_chunks(&J), w = J.nt + J.nc;
    J.partial = calloc((size_t)(chunks * w), sizeof(double));
    if (!J.partial) return SASQ_ERR_NOMEM;
    sasq_parallel_for(chunks, tr_task, &J);
    for (int64_t j = 0; j < w; j++) { /* chunk order: the same sum for any thread count */
        double sum = 0.0;
        for (int64_t k = 0; k < chunks; k++) sum += J.partial[k * w + j];
        if (j < J.nt) grad_t[j] = (float)sum;
        else grad_c[j - J.nt] = (float)sum;
    }
    free(J.partial);
    return SASQ_OK;
}

sasq_status sasq_truncate_quantize(const float *restrict x, const float *restrict t,
                                   int64_t t_stride, const float *restrict scale,
                                   int64_t s_stride, int64_t rows, int64_t cols, int bits,
                                   int8_t *restrict q) {
    const float qm = (float)sasq_qmax(bits);
    for (int64_t j = 0; j < ((t_stride || s_stride) ? cols : 1); j++) {
        /* an infinite ceiling would make y = t + inf * 0 = NaN: refuse before any code is written */
        float s = scale[j * s_stride];
        if (!(sasq_grid_top_ok(s, qm) && t[j * t_stride] < s * qm)) return SASQ_ERR_ARG;
    }
    tr_job J = {.op = 2, .x = x, .t = t, .c = scale, .ts = t_stride, .cs = s_stride, .rows = rows,
                .cols = cols, .bits = bits, .out = q};
    sasq_parallel_for(tr_chunks(&J), tr_task, &J);
    return J.bad ? SASQ_ERR_NONFINITE : SASQ_OK;
}
