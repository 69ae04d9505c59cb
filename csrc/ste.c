/* ste.c — backward of fake_quant: straight-through estimator for x, LSQ gradient for the scale.
 *
 * With u = x / s and y = s * clamp(rint(u), -qmax, qmax):
 *   |u| <= qmax : dy/dx = 1 (STE),  dy/ds = rint(u) - u
 *   u  >  qmax  : dy/dx = 0,        dy/ds = +qmax
 *   u  < -qmax  : dy/dx = 0,        dy/ds = -qmax
 *   u is NaN    : dy/dx = NaN,      dy/ds = NaN (a NaN activation poisons its scale's gradient)
 * grad_scale[j] = grad_scale_factor * sum over the elements that use scale j of g * dy/ds, summed
 * in double (per row, then across rows) so sums over millions of elements stay accurate.
 */
#include <math.h>
#include <stdlib.h>

#include "sasq.h"

/* One chunk of rows; its per-scale sums go to acc (ns doubles, zeroed by the caller). */
static void backward_rows(const float *restrict x, const float *restrict scale, int64_t s_stride,
                          const float *restrict grad_out, int64_t rows, int64_t cols, float qm,
                          float *restrict grad_x, double *restrict acc) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols, *gr = grad_out + r * cols;
        float *gxr = grad_x + r * cols;
        double row_acc = 0.0; /* per-tensor: a row's partial sum first (pairwise-like) */
        for (int64_t c = 0; c < cols; c++) {
            float u = xr[c] / scale[c * s_stride];
            float g = gr[c], gx, ds;
            if (u > qm) {
                gx = 0.0f;
                ds = qm;
            } else if (u < -qm) {
                gx = 0.0f;
                ds = -qm;
            } else if (u == u) {
                gx = g;
                ds = rintf(u) - u;
            } else {
                gx = NAN;
                ds = NAN;
            }
            gxr[c] = gx;
            double contrib = (double)g * (double)ds;
            if (s_stride) acc[c] += contrib;
            else row_acc += contrib;
        }
        if (!s_stride) acc[0] += row_acc;
    }
}

typedef struct {
    const float *x, *scale, *grad_out;
    int64_t s_stride, rows, cols, rpc, ns;
    float qm;
    float *grad_x;
    double *partial; /* (chunks, ns) */
} bwd_job;

static void bwd_task(void *vctx, int64_t t) {
    bwd_job *J = vctx;
    int64_t r0 = t * J->rpc, nr = J->rows - r0 < J->rpc ? J->rows - r0 : J->rpc, off = r0 * J->cols;
    backward_rows(J->x + off, J->scale, J->s_stride, J->grad_out + off, nr, J->cols, J->qm,
                  J->grad_x + off, J->partial + t * J->ns);
}

sasq_status sasq_fake_quant_backward(const float *restrict x, const float *restrict scale,
                                     int64_t s_stride, const float *restrict grad_out,
                                     int64_t rows, int64_t cols, int bits,
                                     double grad_scale_factor, float *restrict grad_x,
                                     float *restrict grad_scale) {
    const int64_t ns = s_stride ? cols : 1, rpc = sasq_chunk_rows(rows, cols);
    const int64_t chunks = (rows + rpc - 1) / rpc;
    double *partial = calloc((size_t)(chunks * ns), sizeof(double));
    if (!partial) return SASQ_ERR_NOMEM;
    bwd_job J = {x, scale, grad_out, s_stride, rows, cols, rpc, ns, (float)sasq_qmax(bits),
                 grad_x, partial};
    sasq_parallel_for(chunks, bwd_task, &J);
    for (int64_t j = 0; j < ns; j++) { /* chunk order: the same sum for any thread count */
        double sum = 0.0;
        for (int64_t t = 0; t < chunks; t++) sum += partial[t * ns + j];
        grad_scale[j] = (float)(sum * grad_scale_factor);
    }
    free(partial);
    return SASQ_OK;
}
