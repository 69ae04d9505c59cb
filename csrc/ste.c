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

sasq_status sasq_fake_quant_backward(const float *restrict x, const float *restrict scale,
                                     int64_t s_stride, const float *restrict grad_out,
                                     int64_t rows, int64_t cols, int bits,
                                     double grad_scale_factor, float *restrict grad_x,
                                     float *restrict grad_scale) {
    const float qm = (float)sasq_qmax(bits);
    const int64_t ns = s_stride ? cols : 1;
    double *acc = calloc((size_t)ns, sizeof(double));
    if (!acc) return SASQ_ERR_NOMEM;
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
    for (int64_t j = 0; j < ns; j++) grad_scale[j] = (float)(acc[j] * grad_scale_factor);
    free(acc);
    return SASQ_OK;
}
