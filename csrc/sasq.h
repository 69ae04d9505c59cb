/* sasq.h — shared conventions of the pure-C kernels (no Python in here).
 *
 * Conventions
 * - Float tensors are float32, C-contiguous, seen as (rows, cols) with cols = the last axis.
 * - A scale (or threshold/ceiling) is either one value (per-tensor, stride 0) or one value per
 *   column (per-channel, stride 1): element (r, c) uses p[c * stride].
 * - Symmetric grid: q in [-qmax, qmax], qmax = 2^(bits-1) - 1; rounding is half-to-even (rintf
 *   in the default rounding mode).
 * - Kernels never allocate Python objects and never see the GIL; they report problems with a
 *   sasq_status that module.c turns into an exception after the GIL is re-acquired.
 */
#ifndef SASQ_H
#define SASQ_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stddef.h>

typedef enum {
    SASQ_OK = 0,
    SASQ_ERR_NONFINITE = 1, /* a non-finite input where the kernel requires finite ones */
    SASQ_ERR_NOMEM = 2,     /* an internal buffer could not be allocated */
    SASQ_ERR_ARG = 3,       /* a bad argument that slipped past the wrapper checks */
} sasq_status;

/* ---- ISA tiers (gemm and elementwise kernels) ---- */
typedef enum { SASQ_ISA_SCALAR = 0, SASQ_ISA_AVX2 = 1, SASQ_ISA_AVX512VNNI = 2 } sasq_isa;

int sasq_isa_available(sasq_isa isa);   /* compiled in and supported by this CPU + OS */
sasq_isa sasq_isa_best(void);
sasq_isa sasq_get_isa(void);
int sasq_set_isa(sasq_isa isa);          /* 0 on success, -1 if not available */

/* ---- thread pool (threads.c) ---- */
typedef void (*sasq_task_fn)(void *ctx, int64_t task);
int sasq_set_num_threads(int n);         /* n >= 1; 0 on success */
int sasq_get_num_threads(void);
/* Runs fn(ctx, t) for t in [0, ntasks) on the pool (the caller works too). If another parallel
 * region is running (a second Python thread), runs the tasks serially in the caller. */
void sasq_parallel_for(int64_t ntasks, sasq_task_fn fn, void *ctx);
/* The same on at most max_threads threads (the caller included; <= 0: all of them). */
void sasq_parallel_for_max(int64_t ntasks, sasq_task_fn fn, void *ctx, int max_threads);
/* Threads a GEMM of m x n x k uses (see gemm_int8.c: small products lose to thread hand-offs). */
int sasq_gemm_threads(int64_t m, int64_t n, int64_t k);
void sasq_gemm_policy(int on); /* 0: every linear_int8 uses all threads (benchmarks only) */

/* Elementwise kernels cut the rows into chunks of at least SASQ_CHUNK elements (at most
 * SASQ_MAX_CHUNKS chunks, which bounds the per-chunk partial sums of the backward kernels) and run
 * them on the pool. The cut does not depend on the thread count, so every result (the double sums
 * included) is identical for any number of threads. Returns rows per chunk. */
#define SASQ_CHUNK 32768
#define SASQ_MAX_CHUNKS 64
static inline int64_t sasq_chunk_rows(int64_t rows, int64_t cols) {
    int64_t r = SASQ_CHUNK / (cols > 0 ? cols : 1), least = (rows + SASQ_MAX_CHUNKS - 1) / SASQ_MAX_CHUNKS;
    if (r < least) r = least;
    return r < 1 ? 1 : r;
}

/* ---- quantization (quant.c) ---- */
static inline int sasq_qmax(int bits) { return (1 << (bits - 1)) - 1; }

/* The overflow rules (module.c refuses these scales before a kernel runs; the kernels that could
 * otherwise produce NaN re-check them and return SASQ_ERR_ARG):
 * - grid: s * top must be finite in float32, top = qmax for a b-bit grid (its ends, the
 *   truncation ceiling s * qmax and every dequantized code are then representable), 128 for
 *   dequantizing arbitrary int8 codes;
 * - linear: the combined scale c = a_scale * w_scale (float32) must be a normal float and
 *   16384 * K * c finite, so float(acc) * c cannot overflow (|acc| <= 128 * 128 * K) and no output
 *   is 0 * inf. */
static inline int sasq_grid_top_ok(float s, float top) { return isfinite(s * top); }
#define SASQ_LINEAR_MAX_ACC 16384.0 /* 128 * 128 */
static inline int sasq_linear_scale_ok(float comb, int64_t k) {
    return comb >= FLT_MIN && (double)comb * SASQ_LINEAR_MAX_ACC * (double)k <= FLT_MAX;
}

/* q = clamp(rint(x / s), -qmax, qmax); SASQ_ERR_NONFINITE if any x is NaN/inf (q then undefined). */
sasq_status sasq_quantize(const float *x, const float *scale, int64_t s_stride, int64_t rows,
                          int64_t cols, int bits, int8_t *q);
/* Per-row dynamic quantization: scales[r] = clip * absmax(row r) / qmax (1 for a zero row),
 * q = clamp(rint(x / scales[r])); SASQ_ERR_NONFINITE on a NaN/inf, SASQ_ERR_ARG on bad bits/clip. */
sasq_status sasq_quantize_dynamic(const float *x, int64_t rows, int64_t cols, int bits, float clip,
                                  int8_t *q, float *scales);
/* x = q * s */
void sasq_dequantize(const int8_t *q, const float *scale, int64_t s_stride, int64_t rows,
                     int64_t cols, float *x);
/* y = s * clamp(rint(x / s), -qmax, qmax); NaN propagates, +-inf saturates to +-s*qmax. */
void sasq_fake_quant(const float *x, const float *scale, int64_t s_stride, int64_t rows,
                     int64_t cols, int bits, float *y);

/* ---- straight-through backward (ste.c) ---- */
/* u = x/s. |u| <= qmax: gx = g, gs += g*(rint(u) - u); u > qmax: gx = 0, gs += g*qmax;
 * u < -qmax: gx = 0, gs += -g*qmax; u NaN: gx = NaN, gs += NaN. gs is accumulated in double per
 * scale (n_scale = 1 or cols), then multiplied by grad_scale_factor and written to grad_scale. */
sasq_status sasq_fake_quant_backward(const float *x, const float *scale, int64_t s_stride,
                                     const float *grad_out, int64_t rows, int64_t cols, int bits,
                                     double grad_scale_factor, float *grad_x, float *grad_scale);

/* ---- adaptive truncation (truncate.c) ----
 * |x| <= t: y = x; else y = sign(x) * (t + (c - t) * tanh((|x| - t) / (c - t))), 0 < t < c. */
void sasq_truncate(const float *x, const float *t, int64_t t_stride, const float *c,
                   int64_t c_stride, int64_t rows, int64_t cols, float *y);
/* grad_t / grad_c: n = 1 (stride 0) or cols (stride 1), accumulated in double, overwritten. */
sasq_status sasq_truncate_backward(const float *x, const float *t, int64_t t_stride,
                                   const float *c, int64_t c_stride, const float *grad_out,
                                   int64_t rows, int64_t cols, float *grad_x, float *grad_t,
                                   float *grad_c);
/* q = clamp(rint(truncate(x; t, c = s*qmax) / s)); SASQ_ERR_NONFINITE on non-finite x;
 * SASQ_ERR_ARG (nothing written) if some s*qmax is not finite in float32 or t >= s*qmax. */
sasq_status sasq_truncate_quantize(const float *x, const float *t, int64_t t_stride,
                                   const float *scale, int64_t s_stride, int64_t rows,
                                   int64_t cols, int bits, int8_t *q);

/* ---- weight fold + per-output-channel RTN (weights.c) ----
 * w' = w * col[j] / row[i] (either NULL), then per row scale = absmax/qmax (1 for a zero row),
 * codes = clamp(rint(w'/scale)); writes fq = codes*scale and/or codes + scale (NULL to skip).
 * bits == 0: fold only, into fq. SASQ_ERR_NONFINITE if w' has a NaN/inf (outputs undefined). */
sasq_status sasq_fold_quant_weight(const float *w, int64_t rows, int64_t cols, const float *col,
                                   const float *row, int bits, float *fq, int8_t *codes,
                                   float *scale);

/* ---- Hadamard rotation (hadamard.c) ----
 * Rows of n = m * p (p = 2^k), index i = a * p + b; H = kron(S, H_p), S the (m, m) `small`
 * (row-major, any float32 values; a +-1 Hadamard makes the transform orthonormal), H_p Sylvester.
 * transpose = 0: y = x H^T / sqrt(n); transpose = 1: y = x H / sqrt(n). y may be x (in place).
 * SASQ_ERR_ARG if n is not m times a power of two. Bit-identical on every tier and thread count. */
sasq_status sasq_hadamard(const float *x, int64_t rows, int64_t n, const float *small, int64_t m,
                          int transpose, float *y);
/* q = quantize(hadamard(x)) bit for bit (scale per tensor or per column of the result, as in
 * sasq_quantize); SASQ_ERR_NONFINITE if a transformed value is NaN/inf. x is not modified. */
sasq_status sasq_hadamard_quantize(const float *x, int64_t rows, int64_t n, const float *small,
                                   int64_t m, int transpose, const float *scale, int64_t s_stride,
                                   int bits, int8_t *q);
/* y = fake_quant(hadamard(x)) bit for bit; SASQ_ERR_ARG (nothing written) if some s * qmax is
 * not finite in float32. */
sasq_status sasq_hadamard_fake_quant(const float *x, int64_t rows, int64_t n, const float *small,
                                     int64_t m, int transpose, const float *scale,
                                     int64_t s_stride, int bits, float *y);

/* ---- INT8 GEMM (gemm_int8.c) ----
 * Weights b (N, K) int8 are packed once into panels of SASQ_NR columns, K padded to a multiple
 * of 4 and interleaved by 4 (the vpdpbusd operand layout); corr[n] = 128 * sum_k b[n, k] lets
 * the VNNI tier compute (a + 128) . b and subtract the shift exactly. */
#define SASQ_NR 64
#define SASQ_MAX_K 131071 /* |sum a*b| <= 2^14 * K must fit in int32 */

typedef struct {
    int64_t n, k;       /* logical shape of the weights */
    int64_t kp;         /* k rounded up to a multiple of 4 */
    int64_t n_panels;   /* ceil(n / SASQ_NR) */
    int8_t *data;       /* n_panels * kp * SASQ_NR bytes, 64-byte aligned */
    int32_t *corr;      /* n_panels * SASQ_NR: 128 * rowsum (0 for padding columns) */
} sasq_packed;

sasq_status sasq_pack_weights(const int8_t *b, int64_t n, int64_t k, sasq_packed *out);
void sasq_packed_free(sasq_packed *p);
/* c (M, N) int32 = a (M, K) @ b.T, exact. */
sasq_status sasq_gemm_packed_i32(const int8_t *a, int64_t m, const sasq_packed *p, int32_t *c);
/* y (M, N) float32 = float(a @ b.T) * (a_scale * w_scales[n]) (the product taken in float32);
 * SASQ_ERR_ARG (nothing written) unless every product passes sasq_linear_scale_ok. */
sasq_status sasq_gemm_packed_f32(const int8_t *a, int64_t m, const sasq_packed *p, float a_scale,
                                 const float *w_scales, float *y);
/* The same with one activation scale per row (sink rows, per-token scales):
 * y[i, n] = (float(acc) * w_scales[n]) * a_scales[i]; SASQ_ERR_ARG unless every w_scales[n] and
 * every product a_scales[i] * w_scales[n] passes sasq_linear_scale_ok (checked at the extremes). */
sasq_status sasq_gemm_packed_f32_rows(const int8_t *a, int64_t m, const sasq_packed *p,
                                      const float *a_scales, const float *w_scales, float *y);

/* Measurement helpers for the benchmark. */
/* int8 GOP/s of a register-only vpdpbusd loop on `threads` threads for ~`seconds`, by wall clock
 * (returned) and by the threads' CPU time (*cpu_gops, may be NULL); 0 without VNNI. */
double sasq_peak_int8_gops(int threads, double seconds, double *cpu_gops);
int64_t sasq_stream_read(const sasq_packed *p);           /* reads every packed byte once */

#endif /* SASQ_H */
