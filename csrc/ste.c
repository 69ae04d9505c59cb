/* ste.c — backward of fake_quant: straight-through estimator for x, LSQ gradient for the scale.
 *
 * With u = x / s and y = s * clamp(rint(u), -qmax, qmax):
 *   |u| <= qmax : dy/dx = 1 (STE),  dy/ds = rint(u) - u
 *   u  >  qmax  : dy/dx = 0,        dy/ds = +qmax
 *   u  < -qmax  : dy/dx = 0,        dy/ds = -qmax
 *   u is NaN    : dy/dx = NaN,      dy/ds = NaN (a NaN activation poisons its scale's gradient)
 * grad_scale[j] = grad_scale_factor * sum over the elements that use scale j of g * dy/ds, summed
 * in double (per-tensor: 8 lanes per row, rows, then fixed row chunks) so sums over millions of
 * elements stay accurate. Baseline and AVX2 tiers share one branch-free body.
 */
#include <math.h>
#include <stdlib.h>

#include "sasq.h"

#define INLINE static inline __attribute__((always_inline))
#define LANES 8 /* per-tensor sums: 8 independent double lanes, so the loop vectorises */

/* d y / d s and d y / d x of one element, branch-free (NaN u: ds = NaN via rint(u) - u). */
INLINE void ste1(float x, float s, float g, float qm, float *gx, float *ds) {
    float u = x / s;
    int over = u > qm, under = u < -qm;
    *ds = over ? qm : (under ? -qm : rintf(u) - u);
    *gx = (over | under) ? 0.0f : (u == u ? g : NAN);
}

/* One chunk of rows; its per-scale sums go to acc (ns doubles, zeroed by the caller). */
INLINE void backward_body(const float *restrict x, const float *restrict scale, int64_t ss,
                          const float *restrict grad_out, int64_t rows, int64_t cols, float qm,
                          float *restrict grad_x, double *restrict acc) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols, *gr = grad_out + r * cols;
        float *gxr = grad_x + r * cols;
        if (ss) {
            for (int64_t c = 0; c < cols; c++) {
                float gx, ds;
                ste1(xr[c], scale[c], gr[c], qm, &gx, &ds);
                gxr[c] = gx;
                acc[c] += (double)gr[c] * (double)ds;
            }
        } else {
            double lane[LANES] = {0};
            int64_t c = 0;
            for (; c + LANES <= cols; c += LANES) {
                for (int l = 0; l < LANES; l++) {
                    float gx, ds;
                    ste1(xr[c + l], scale[0], gr[c + l], qm, &gx, &ds);
                    gxr[c + l] = gx;
                    lane[l] += (double)gr[c + l] * (double)ds;
                }
            }
            for (; c < cols; c++) {
                float gx, ds;
                ste1(xr[c], scale[0], gr[c], qm, &gx, &ds);
                gxr[c] = gx;
                lane[0] += (double)gr[c] * (double)ds;
            }
            double row = 0.0; /* a row's lanes, then rows: a short, fixed summation order */
            for (int l = 0; l < LANES; l++) row += lane[l];
            acc[0] += row;
        }
    }
}

static void backward_rows_scalar(const float *x, const float *scale, int64_t ss,
                                 const float *grad_out, int64_t rows, int64_t cols, float qm,
                                 float *grad_x, double *acc) {
    if (ss) backward_body(x, scale, 1, grad_out, rows, cols, qm, grad_x, acc);
    else backward_body(x, scale, 0, grad_out, rows, cols, qm, grad_x, acc);
}
#if defined(__x86_64__)
__attribute__((target("avx2"))) static void backward_rows_avx2(
    const float *x, const float *scale, int64_t ss, const float *grad_out, int64_t rows,
    int64_t cols, float qm, float *grad_x, double *acc) {
    if (ss) backward_body(x, scale, 1, grad_out, rows, cols, qm, grad_x, acc);
    else backward_body(x, scale, 0, grad_out, rows, cols, qm, grad_x, acc);
}
#endif

static void backward_rows(const float *x, const float *scale, int64_t ss, const float *grad_out,
                          int64_t rows, int64_t cols, float qm, float *grad_x, double *acc) {
#if defined(__x86_64__)
    if (sasq_get_isa() >= SASQ_ISA_AVX2) {
        backward_rows_avx2(x, scale, ss, grad_out, rows, cols, qm, grad_x, acc);
        return;
    }
#endif
    backward_rows_scalar(x, scale, ss, grad_out, rows, cols, qm, grad_x, acc);
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
