/* test_kernels.c — the pure-C kernels on their own, built by `make sanitize` under ASan/UBSan.
 * Each check compares against a naive loop written here (int64 GEMM, literal expectations). */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sasq.h"

static int failures = 0, checks = 0;
#define CHECK(cond, ...)                                                                         \
    do {                                                                                         \
        checks++;                                                                                \
        if (!(cond)) {                                                                           \
            failures++;                                                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                 \
            fprintf(stderr, __VA_ARGS__);                                                        \
            fputc('\n', stderr);                                                                 \
        }                                                                                        \
    } while (0)

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint32_t rnd(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1DULL) >> 32);
}
static float frand(float lo, float hi) { return lo + (hi - lo) * (float)(rnd() / 4294967296.0); }

static void test_quantize(void) {
    const float x[] = {-0.3125f, -0.1875f, -0.0625f, 0.0625f, 0.1875f, 0.3125f, 100.f, -100.f};
    const int8_t expect[] = {-2, -2, 0, 0, 2, 2, 127, -127}; /* s = 0.125: ties to even */
    float s = 0.125f;
    int8_t q[8];
    CHECK(sasq_quantize(x, &s, 0, 1, 8, 8, q) == SASQ_OK, "quantize status");
    for (int i = 0; i < 8; i++) CHECK(q[i] == expect[i], "quantize[%d] = %d, want %d", i, q[i], expect[i]);
    float y[8];
    sasq_fake_quant(x, &s, 0, 2, 4, 8, y);
    for (int i = 0; i < 8; i++) CHECK(y[i] == expect[i] * s, "fake_quant[%d]", i);
    float xb[3] = {1.0f, NAN, 2.0f};
    CHECK(sasq_quantize(xb, &s, 0, 1, 3, 8, q) == SASQ_ERR_NONFINITE, "quantize NaN must fail");
    sasq_fake_quant(xb, &s, 0, 1, 3, 4, y);
    CHECK(isnan(y[1]) && y[0] == 0.875f && y[2] == 0.875f, "fake_quant NaN/clamp (4 bits: qmax 7)");
    /* per-channel */
    float sc[3] = {0.5f, 1.0f, 2.0f}, xc[6] = {1.f, 1.f, 1.f, -3.f, -3.f, -3.f};
    int8_t qc[6];
    sasq_quantize(xc, sc, 1, 2, 3, 8, qc);
    CHECK(qc[0] == 2 && qc[1] == 1 && qc[2] == 0 && qc[3] == -6 && qc[4] == -3 && qc[5] == -2,
          "per-channel quantize");
    float d[6];
    sasq_dequantize(qc, sc, 1, 2, 3, d);
    CHECK(d[0] == 1.f && d[3] == -3.f && d[5] == -4.f, "dequantize");
}

static void test_ste(void) {
    float x[5] = {0.26f, -0.26f, 50.f, -50.f, NAN}, g[5] = {1, 2, 3, 4, 1}, gx[5], gs;
    float s = 0.1f;
    CHECK(sasq_fake_quant_backward(x, &s, 0, g, 1, 4, 8, 1.0, gx, &gs) == SASQ_OK, "ste status");
    CHECK(gx[0] == 1 && gx[1] == 2 && gx[2] == 0 && gx[3] == 0, "ste grad_x");
    double u = (double)(0.26f / 0.1f);
    double want = (rint(u) - u) * 1 + (-rint(u) + u) * 2 + 127.0 * 3 - 127.0 * 4;
    CHECK(fabs(gs - want) < 1e-4, "ste grad_scale %g want %g", gs, want);
    CHECK(sasq_fake_quant_backward(x, &s, 0, g, 1, 5, 8, 0.5, gx, &gs) == SASQ_OK, "ste status");
    CHECK(isnan(gx[4]) && isnan(gs), "ste NaN");
}

static float trunc_ref(float x, float t, float c) {
    double a = fabs((double)x);
    if (a <= t) return x;
    double y = t + (c - t) * tanh((a - t) / (c - t));
    return (float)(x < 0 ? -y : y);
}

static void test_truncate(void) {
    enum { R = 3, C = 17 };
    float x[R * C], y[R * C], g[R * C], gx[R * C], t[C], c = 4.0f, gt[C], gc;
    for (int j = 0; j < C; j++) t[j] = frand(0.5f, 2.0f);
    for (int i = 0; i < R * C; i++) { x[i] = frand(-10, 10); g[i] = frand(-1, 1); }
    sasq_truncate(x, t, 1, &c, 0, R, C, y);
    for (int i = 0; i < R * C; i++) {
        CHECK(fabsf(y[i] - trunc_ref(x[i], t[i % C], c)) <= 1e-6f * fabsf(y[i]), "truncate[%d]", i);
        CHECK(fabsf(y[i]) <= c, "truncate bounded");
    }
    CHECK(sasq_truncate_backward(x, t, 1, &c, 0, g, R, C, gx, gt, &gc) == SASQ_OK, "trunc bwd");
    /* grad_c against central differences in double */
    double h = 1e-3, lp = 0, lm = 0;
    for (int i = 0; i < R * C; i++) {
        double a = fabs((double)x[i]), tv = t[i % C], sg = x[i] < 0 ? -1 : 1;
        if (a <= tv) continue;
        lp += g[i] * sg * (tv + (c + h - tv) * tanh((a - tv) / (c + h - tv)));
        lm += g[i] * sg * (tv + (c - h - tv) * tanh((a - tv) / (c - h - tv)));
    }
    double fd = (lp - lm) / (2 * h);
    CHECK(fabs(gc - fd) <= 1e-4 * (1 + fabs(fd)), "grad_c %g vs fd %g", gc, fd);
    float xi[2] = {INFINITY, -INFINITY}, yi[2], one = 1.0f, two = 2.0f;
    sasq_truncate(xi, &one, 0, &two, 0, 1, 2, yi);
    CHECK(yi[0] == 2.0f && yi[1] == -2.0f, "truncate inf");
    float s = 0.01f, tq = 1.0f, xq[3] = {0.5f, 1.35f, 1e6f};
    int8_t q[3];
    CHECK(sasq_truncate_quantize(xq, &tq, 0, &s, 0, 1, 3, 8, q) == SASQ_OK, "trunc quant");
    CHECK(q[0] == 50 && q[1] == 123 && q[2] == 127, "trunc quant values %d %d %d", q[0], q[1], q[2]);
    xq[1] = NAN;
    CHECK(sasq_truncate_quantize(xq, &tq, 0, &s, 0, 1, 3, 8, q) == SASQ_ERR_NONFINITE, "tq NaN");
}

/* Scales that would overflow are refused by the kernels themselves (module.c refuses them first):
 * truncate_quantize with an infinite ceiling s * qmax used to return NaN cast to int8 (UB). */
static void test_overflow_refused(void) {
    float x[2] = {3e38f, 1e38f}, t = 1.0f, s = 1e37f;
    int8_t q[2] = {55, 55};
    CHECK(sasq_truncate_quantize(x, &t, 0, &s, 0, 1, 2, 8, q) == SASQ_ERR_ARG, "tq s*qmax = inf");
    CHECK(q[0] == 55 && q[1] == 55, "tq wrote codes before refusing");
    s = 1e36f; /* 1.27e38: finite, allowed */
    CHECK(sasq_truncate_quantize(x, &t, 0, &s, 0, 1, 2, 8, q) == SASQ_OK, "tq s = 1e36");
    for (int i = 0; i < 2; i++) {
        int want = (int)rintf(trunc_ref(x[i], t, s * 127.0f) / s); /* 125, 83 */
        CHECK(q[i] == want, "tq s = 1e36 code %d want %d", q[i], want);
    }
    int8_t w[2 * 4] = {1, 0, 0, 0, 0, 1, 0, 0}, a[4] = {0, 1, 0, 0};
    float y[2] = {-1, -1}, ws[2] = {1e30f, 1.0f};
    sasq_packed p;
    CHECK(sasq_pack_weights(w, 2, 4, &p) == SASQ_OK, "pack");
    CHECK(sasq_gemm_packed_f32(a, 1, &p, 1e30f, ws, y) == SASQ_ERR_ARG, "linear 1e30 * 1e30");
    CHECK(y[0] == -1 && y[1] == -1, "linear wrote before refusing");
    ws[0] = 1e-30f;
    CHECK(sasq_gemm_packed_f32(a, 1, &p, 1e-20f, ws, y) == SASQ_ERR_ARG, "linear underflow");
    ws[0] = 2.0f;
    CHECK(sasq_gemm_packed_f32(a, 1, &p, 0.5f, ws, y) == SASQ_OK && y[0] == 0 && y[1] == 0.5f,
          "linear ok");
    sasq_packed_free(&p);
}

/* Far outside the knee the threshold gradient is tiny; 1 - tanh z must not cancel. z = 20:
 * exact dy/dt = 2e/(1+e) + (z-1) 4e/(1+e)^2, e = exp(-2z) (the old form lost 2.6 %). */
static void test_truncate_backward_far_tail(void) {
    float x[1] = {21.0f}, g[1] = {1.0f}, gx[1], t = 1.0f, c = 2.0f, gt, gc;
    CHECK(sasq_truncate_backward(x, &t, 0, &c, 0, g, 1, 1, gx, &gt, &gc) == SASQ_OK, "bwd");
    long double z = 20.0L, e = expl(-2.0L * z);
    long double want = 2 * e / (1 + e) + (z - 1) * 4 * e / ((1 + e) * (1 + e));
    CHECK(fabsl(gt - want) <= 1e-6L * want, "grad_t far tail %.9g want %.9Lg", gt, want);
}

static void gemm_case(int64_t m, int64_t k, int64_t n, int extreme) {
    int8_t *a = malloc((size_t)(m * k)), *b = malloc((size_t)(n * k));
    int32_t *c = malloc((size_t)(m * n) * 4);
    float *y = malloc((size_t)(m * n) * 4), *ws = malloc((size_t)n * 4);
    for (int64_t i = 0; i < m * k; i++) a[i] = extreme ? (int8_t)(i % 3 ? -128 : 127) : (int8_t)rnd();
    for (int64_t i = 0; i < n * k; i++) b[i] = extreme ? (int8_t)(i % 2 ? -128 : 127) : (int8_t)rnd();
    for (int64_t j = 0; j < n; j++) ws[j] = frand(0.01f, 1.0f);
    sasq_packed p;
    CHECK(sasq_pack_weights(b, n, k, &p) == SASQ_OK, "pack");
    CHECK(sasq_gemm_packed_i32(a, m, &p, c) == SASQ_OK, "gemm");
    CHECK(sasq_gemm_packed_f32(a, m, &p, 0.5f, ws, y) == SASQ_OK, "linear");
    int bad = 0;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            int64_t acc = 0;
            for (int64_t kk = 0; kk < k; kk++) acc += (int64_t)a[i * k + kk] * b[j * k + kk];
            if (c[i * n + j] != acc) bad++;
            if (y[i * n + j] != (float)acc * (0.5f * ws[j])) bad++;
        }
    CHECK(bad == 0, "gemm isa %d m=%lld k=%lld n=%lld: %d mismatches", (int)sasq_get_isa(),
          (long long)m, (long long)k, (long long)n, bad);
    sasq_packed_free(&p);
    free(a); free(b); free(c); free(y); free(ws);
}

static void test_gemm(void) {
    const int64_t ms[] = {1, 3, 6, 7, 97}, ks[] = {1, 3, 4, 33, 65, 255}, ns[] = {1, 8, 17, 64, 65};
    for (int isa = SASQ_ISA_SCALAR; isa <= SASQ_ISA_AVX512VNNI; isa++) {
        if (sasq_set_isa((sasq_isa)isa) != 0) {
            printf("  (isa %d not available here: skipped)\n", isa);
            continue;
        }
        for (int threads = 1; threads <= 3; threads += 2) {
            sasq_set_num_threads(threads);
            for (size_t i = 0; i < sizeof ms / sizeof *ms; i++)
                for (size_t j = 0; j < sizeof ks / sizeof *ks; j++)
                    for (size_t l = 0; l < sizeof ns / sizeof *ns; l++) gemm_case(ms[i], ks[j], ns[l], 0);
            gemm_case(13, 1023, 130, 1);
        }
    }
    sasq_set_isa(sasq_isa_best());
    sasq_packed p;
    CHECK(sasq_pack_weights(NULL, 0, 4, &p) == SASQ_ERR_ARG, "pack rejects n = 0");
    CHECK(sasq_set_num_threads(0) != 0, "0 threads rejected");
    int8_t w[64 * 8];
    memset(w, 1, sizeof w);
    CHECK(sasq_pack_weights(w, 64, 8, &p) == SASQ_OK, "pack");
    (void)sasq_stream_read(&p);
    sasq_packed_free(&p);
    double cpu = -1, peak = sasq_peak_int8_gops(2, 0.01, &cpu);
    CHECK(peak >= 0 && cpu >= 0, "peak");
    sasq_set_num_threads(1);
}

/* Large inputs run in several row chunks on the pool: same results for 1 and 3 threads. */
static void test_chunked(void) {
    enum { R = 100, C = 1000 };
    float *x = malloc(sizeof(float) * R * C), *g = malloc(sizeof(float) * R * C);
    float *y1 = malloc(sizeof(float) * R * C), *y3 = malloc(sizeof(float) * R * C);
    float gs1[C], gs3[C], gt1, gt3, gc1, gc3, s = 0.01f, t = 0.5f, c = 1.5f;
    int8_t *q = malloc(R * C);
    for (int i = 0; i < R * C; i++) { x[i] = frand(-3, 3); g[i] = frand(-1, 1); }
    float sc[C];
    for (int j = 0; j < C; j++) sc[j] = frand(0.005f, 0.02f);
    sasq_set_num_threads(1);
    sasq_fake_quant_backward(x, sc, 1, g, R, C, 8, 1.0, y1, gs1);
    sasq_truncate_backward(x, &t, 0, &c, 0, g, R, C, y1 + 0, &gt1, &gc1);
    sasq_set_num_threads(3);
    sasq_fake_quant_backward(x, sc, 1, g, R, C, 8, 1.0, y3, gs3);
    sasq_truncate_backward(x, &t, 0, &c, 0, g, R, C, y3 + 0, &gt3, &gc3);
    CHECK(memcmp(y1, y3, sizeof(float) * R * C) == 0, "chunked grad_x differs with threads");
    CHECK(memcmp(gs1, gs3, sizeof gs1) == 0 && gt1 == gt3 && gc1 == gc3, "chunked sums differ");
    x[R * C - 1] = INFINITY;
    CHECK(sasq_quantize(x, &s, 0, R, C, 8, q) == SASQ_ERR_NONFINITE, "inf in the last chunk");
    CHECK(sasq_truncate_quantize(x, &t, 0, &s, 0, R, C, 8, q) == SASQ_ERR_NONFINITE, "tq inf");
    sasq_set_num_threads(1);
    free(x); free(g); free(y1); free(y3); free(q);
}

static void test_fold_quant_weight(void) {
    /* literal: row 0 = [1, -2, 4] * col [1, 1, 0.5] / row 2 = [0.5, -1, 1]; 8 bits: s = 1/127 */
    const float w[6] = {1.f, -2.f, 4.f, 0.f, 0.f, 0.f}, col[3] = {1.f, 1.f, 0.5f}, row[2] = {2.f, 1.f};
    float fq[6], sc[2];
    int8_t cd[6];
    CHECK(sasq_fold_quant_weight(w, 2, 3, col, row, 8, fq, cd, sc) == SASQ_OK, "fold status");
    CHECK(sc[0] == 1.0f / 127.0f && sc[1] == 1.0f, "fold scales %g %g", sc[0], sc[1]);
    CHECK(cd[0] == 64 && cd[1] == -127 && cd[2] == 127 && cd[3] == 0, "fold codes %d %d %d", cd[0], cd[1], cd[2]);
    CHECK(fq[2] == 127.0f * sc[0] && fq[4] == 0.0f, "fold fake quant");
    /* 4 bits, no factors, odd sizes: codes * scale == fake; |codes| <= 7; a NaN is refused */
    enum { R = 37, C = 19 };
    float *x = malloc(sizeof(float) * R * C), *f = malloc(sizeof(float) * R * C), s2[R];
    int8_t *q = malloc(R * C);
    for (int i = 0; i < R * C; i++) x[i] = frand(-5, 5);
    CHECK(sasq_fold_quant_weight(x, R, C, NULL, NULL, 4, f, q, s2) == SASQ_OK, "fold 4-bit");
    int ok = 1;
    for (int i = 0; i < R * C; i++) ok &= q[i] >= -7 && q[i] <= 7 && f[i] == (float)q[i] * s2[i / C];
    CHECK(ok, "codes * scale == fake quant, |codes| <= 7");
    x[5] = NAN;
    CHECK(sasq_fold_quant_weight(x, R, C, NULL, NULL, 4, f, NULL, NULL) == SASQ_ERR_NONFINITE, "NaN");
    CHECK(sasq_fold_quant_weight(x, R, C, NULL, NULL, 9, f, NULL, NULL) == SASQ_ERR_ARG, "bits 9");
    free(x); free(f); free(q);
}

/* Hadamard: against a naive double loop over the explicit kron(S, H_p) with a generic S, within
 * the worst-case float32 budget (depth-k butterfly tree + m-term sum + the 1/sqrt(n) multiply and
 * its rounding: (k + m + 1) u sum_j |H_ij x_j| / sqrt(n), u = 2^-24); every tier bit-identical to
 * the scalar one, in place = out of place, fused quantize/fake_quant = the two kernels in turn. */
static int popcount64(int64_t v) { return __builtin_popcountll((unsigned long long)v); }

static void hadamard_case(int64_t m, int64_t p, int64_t rows, int transpose) {
    int64_t n = m * p, k = 0;
    while ((1LL << k) < p) k++;
    float *s = malloc(sizeof(float) * (size_t)(m * m)), *x = malloc(sizeof(float) * (size_t)(rows * n));
    float *y0 = malloc(sizeof(float) * (size_t)(rows * n)), *y = malloc(sizeof(float) * (size_t)(rows * n));
    for (int64_t i = 0; i < m * m; i++) s[i] = frand(-1.5f, 1.5f);
    for (int64_t i = 0; i < rows * n; i++) x[i] = frand(-4, 4);
    sasq_set_isa(SASQ_ISA_SCALAR);
    CHECK(sasq_hadamard(x, rows, n, s, m, transpose, y0) == SASQ_OK, "hadamard status");
    int bad = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i++) {
            double acc = 0, mag = 0;
            for (int64_t j = 0; j < n; j++) {
                int64_t a = i / p, b = i % p, a2 = j / p, b2 = j % p;
                double sij = transpose ? s[a2 * m + a] : s[a * m + a2]; /* H^T[j][i] = H[i][j] */
                double h = sij * ((popcount64(b & b2) & 1) ? -1.0 : 1.0);
                acc += h * x[r * n + j];
                mag += fabs(h * x[r * n + j]);
            }
            double inv = 1.0 / sqrt((double)n), budget = (double)(k + m + 1) * 0x1p-24 * mag * inv;
            if (!(fabs(y0[r * n + i] - acc * inv) <= budget * 1.01 + 1e-30)) bad++;
        }
    CHECK(bad == 0, "hadamard m=%lld p=%lld rows=%lld T=%d: %d outside the budget", (long long)m,
          (long long)p, (long long)rows, transpose, bad);
    for (int isa = SASQ_ISA_AVX2; isa <= SASQ_ISA_AVX512VNNI; isa++) {
        if (sasq_set_isa((sasq_isa)isa) != 0) continue;
        CHECK(sasq_hadamard(x, rows, n, s, m, transpose, y) == SASQ_OK, "hadamard status");
        CHECK(memcmp(y, y0, sizeof(float) * (size_t)(rows * n)) == 0,
              "hadamard isa %d m=%lld p=%lld T=%d differs from scalar", isa, (long long)m,
              (long long)p, transpose);
        memcpy(y, x, sizeof(float) * (size_t)(rows * n));
        CHECK(sasq_hadamard(y, rows, n, s, m, transpose, y) == SASQ_OK, "in place status");
        CHECK(memcmp(y, y0, sizeof(float) * (size_t)(rows * n)) == 0, "in place differs");
    }
    free(s); free(x); free(y0); free(y);
}

static void test_hadamard(void) {
    const int64_t cases[][2] = {{1, 1}, {1, 2}, {1, 8}, {1, 64}, {12, 1}, {12, 2}, {3, 4},
                                {5, 8}, {12, 16}, {7, 32}, {4, 64}, {3, 256}, {1, 512}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++)
        for (int64_t rows = 1; rows <= 3; rows += 2)
            for (int tr = 0; tr <= 1; tr++) hadamard_case(cases[c][0], cases[c][1], rows, tr);
    sasq_set_isa(sasq_isa_best());

    /* the inverse: H (+-1, Paley I of order 4: S = I + [[0,1,1,1],[-1,0,1,-1],[-1,-1,0,1],
     * [-1,1,-1,0]]) then H^T gives x back */
    const float h4[16] = {1, 1, 1, 1, -1, 1, 1, -1, -1, -1, 1, 1, -1, 1, -1, 1};
    enum { R = 100, N = 4 * 256 };
    float *x = malloc(sizeof(float) * R * N), *y = malloc(sizeof(float) * R * N);
    float *z = malloc(sizeof(float) * R * N), *f1 = malloc(sizeof(float) * R * N);
    int8_t *q1 = malloc(R * N), *q2 = malloc(R * N);
    for (int i = 0; i < R * N; i++) x[i] = frand(-3, 3);
    CHECK(sasq_hadamard(x, R, N, h4, 4, 0, y) == SASQ_OK && sasq_hadamard(y, R, N, h4, 4, 1, z) == SASQ_OK, "inv");
    float worst = 0;
    for (int i = 0; i < R * N; i++) worst = fmaxf(worst, fabsf(z[i] - x[i]));
    CHECK(worst < 1e-5f, "H then H^T: max error %g", worst);
    /* fixed row chunks: 1 and 3 threads give the same bits (R * N spans several chunks) */
    sasq_set_num_threads(3);
    CHECK(sasq_hadamard(x, R, N, h4, 4, 0, z) == SASQ_OK, "3 threads");
    CHECK(memcmp(y, z, sizeof(float) * R * N) == 0, "hadamard differs with threads");
    /* fused = quantize(hadamard(x)), fake_quant(hadamard(x)); x untouched */
    float sc = 0.02f, keep = x[5];
    CHECK(sasq_hadamard_quantize(x, R, N, h4, 4, 0, &sc, 0, 8, q1) == SASQ_OK, "hq status");
    CHECK(sasq_quantize(y, &sc, 0, R, N, 8, q2) == SASQ_OK && memcmp(q1, q2, R * N) == 0, "hq != q(h)");
    CHECK(sasq_hadamard_fake_quant(x, R, N, h4, 4, 0, &sc, 0, 4, f1) == SASQ_OK, "hfq status");
    sasq_fake_quant(y, &sc, 0, R, N, 4, z);
    CHECK(memcmp(f1, z, sizeof(float) * R * N) == 0 && x[5] == keep, "hfq != fq(h)");
    sasq_set_num_threads(1);
    x[R * N - 1] = NAN; /* the last row's outputs all become NaN: refused */
    CHECK(sasq_hadamard_quantize(x, R, N, h4, 4, 0, &sc, 0, 8, q1) == SASQ_ERR_NONFINITE, "hq NaN");
    float big = 1e37f;
    f1[0] = -7;
    CHECK(sasq_hadamard_fake_quant(x, R, N, h4, 4, 0, &big, 0, 8, f1) == SASQ_ERR_ARG && f1[0] == -7,
          "hfq s * qmax = inf must be refused before writing");
    CHECK(sasq_hadamard(x, 1, 36, h4, 4, 0, y) == SASQ_ERR_ARG, "n = 4 * 9: not m * 2^k");
    CHECK(sasq_hadamard(x, 1, 6, h4, 4, 0, y) == SASQ_ERR_ARG, "n not a multiple of m");
    free(x); free(y); free(z); free(f1); free(q1); free(q2);
}

int main(void) {
    test_fold_quant_weight();
    test_quantize();
    test_ste();
    test_truncate();
    test_overflow_refused();
    test_truncate_backward_far_tail();
    test_chunked();
    test_hadamard();
    test_gemm();
    printf("test_kernels: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
