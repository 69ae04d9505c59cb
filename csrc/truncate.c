/* truncate.c — adaptive outlier truncation ("soft knee"), its backward, and a fused
 * truncate + quantize for inference.
 *
 *   |x| <= t : y = x
 *   |x| >  t : y = sign(x) * (t + (c - t) * tanh(z)),   z = (|x| - t) / (c - t),   0 < t < c
 *
 * Why this function: identity on the bulk (|x| <= t), monotone, continuous with a continuous
 * first derivative at the knee (slope 1 = sech^2(0)), and |y| < c for every finite x, so the
 * quantizer's clamp at c = s * qmax never bites and every outlier keeps a distinct, ordered code
 * until it saturates. Gradients (a = |x|, g = upstream gradient, zero inside the knee):
 *   dy/dx = sech^2(z)
 *   dy/dt = sign(x) * (1 - tanh z + (z - 1) sech^2 z)
 *   dy/dc = sign(x) * (tanh z - z sech^2 z)
 * Arithmetic is in double and rounded once to float. z is capped at 30 (tanh(30) == 1 in
 * double) so that x = +-inf gives y = +-c with finite gradients instead of inf * 0. NaN in x
 * propagates to y and to all three gradients.
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
    double y = t + (c - t) * tanh(knee_z(a, t, c));
    return (float)(xf < 0 ? -y : y);
}

void sasq_truncate(const float *restrict x, const float *restrict t, int64_t t_stride,
                   const float *restrict c, int64_t c_stride, int64_t rows, int64_t cols,
                   float *restrict y) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < cols; j++)
            y[r * cols + j] = truncate1(x[r * cols + j], t[j * t_stride], c[j * c_stride]);
}

sasq_status sasq_truncate_backward(const float *restrict x, const float *restrict t,
                                   int64_t t_stride, const float *restrict c, int64_t c_stride,
                                   const float *restrict grad_out, int64_t rows, int64_t cols,
                                   float *restrict grad_x, float *restrict grad_t,
                                   float *restrict grad_c) {
    const int64_t nt = t_stride ? cols : 1, nc = c_stride ? cols : 1;
    double *acc_t = calloc((size_t)(nt + nc), sizeof(double));
    if (!acc_t) return SASQ_ERR_NOMEM;
    double *acc_c = acc_t + nt;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = 0; j < cols; j++) {
            int64_t i = r * cols + j;
            double xv = x[i], a = fabs(xv), tv = t[j * t_stride], cv = c[j * c_stride];
            double g = grad_out[i];
            if (a <= tv) {
                grad_x[i] = (float)g;
                continue;
            }
            double z = knee_z(a, tv, cv), th = tanh(z), ch = cosh(z);
            double s2 = 1.0 / (ch * ch);
            double sg = xv < 0 ? -1.0 : 1.0;
            if (xv != xv) sg = NAN;
            grad_x[i] = (float)(g * s2);
            acc_t[j * t_stride] += g * sg * (1.0 - th + (z - 1.0) * s2);
            acc_c[j * c_stride] += g * sg * (th - z * s2);
        }
    }
    for (int64_t j = 0; j < nt; j++) grad_t[j] = (float)acc_t[j];
    for (int64_t j = 0; j < nc; j++) grad_c[j] = (float)acc_c[j];
    free(acc_t);
    return SASQ_OK;
}

sasq_status sasq_truncate_quantize(const float *restrict x, const float *restrict t,
                                   int64_t t_stride, const float *restrict scale,
                                   int64_t s_stride, int64_t rows, int64_t cols, int bits,
                                   int8_t *restrict q) {
    const float qm = (float)sasq_qmax(bits);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = 0; j < cols; j++) {
            int64_t i = r * cols + j;
            float v = x[i], s = scale[j * s_stride];
            if (!(fabsf(v) <= FLT_MAX)) return SASQ_ERR_NONFINITE;
            float y = truncate1(v, t[j * t_stride], s * qm);
            float u = rintf(y / s);
            u = u < -qm ? -qm : (u > qm ? qm : u);
            q[i] = (int8_t)(int)u;
        }
    }
    return SASQ_OK;
}
