/* gemm_int8.c — exact INT8 GEMM c = a @ b.T (a (M, K) int8 activations, b (N, K) int8 weights)
 * with three tiers over one packed weight layout:
 *
 *   packed panel p (columns 64p .. 64p+63), k-group g (k = 4g .. 4g+3):
 *       byte [p * kp * 64 + g * 256 + col * 4 + (k % 4)] = b[64p + col, k]
 *   K is padded to kp (multiple of 4) and N to whole panels with zeros, so padding adds nothing.
 *
 * - scalar: the readable ground truth, int32 dot products straight from the packed layout.
 * - AVX2: activations widened to int16, weights sign-extended with vpmovsxbw, products summed in
 *   pairs by vpmaddwd (exact: |2 * 128 * 128| < 2^31; no vpmaddubsw, whose int16 sums saturate).
 * - AVX-512 VNNI: vpdpbusd needs u8 x s8, so activations are shifted a + 128 (in [0, 255], exact
 *   for every int8 including -128) and the accumulators start at -corr[n] = -128 * sum_k b[n, k],
 *   precomputed at pack time. int32 wrap-around is harmless: the true result fits in int32
 *   (K <= SASQ_MAX_K) and two's complement sums are exact modulo 2^32.
 *
 * Blocking: a task is (block of MC rows, one 64-column panel); tasks are handed out row-block
 * major, so a row block of activations stays in L2 while panels stream past. Inside a task, K is
 * cut into 16 KiB weight slices that every 6-row tile of the block uses while the slice is in L1
 * (accumulators parked in a scratch between slices); activations are copied once per call as
 * a + 128 in a tile-major layout (each tile's K slice contiguous). The micro-tile is 6 rows x 64
 * columns for VNNI (24 zmm accumulators, no spills) and 4 rows x 8 columns for AVX2. The float
 * store (linear_int8) converts and multiplies by a_scale * w_scales[n] in the same pass.
 * Measured per CPU second on one Zen 4 core: ~85% of the vpdpbusd peak at M >= 96 (the K
 * blocking measured the same as none at K <= 11008, within the noise of a shared machine; it
 * bounds the cache footprint for larger K).
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <float.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sasq.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#define TARGET_AVX2 __attribute__((target("avx2")))
#define TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#else
#define HAVE_X86 0
#endif
#define INLINE static inline __attribute__((always_inline))

#define MC 96 /* rows per task: a multiple of both micro-tile heights */
#define MR_VNNI 6
#define MR_AVX2 4

/* ---------------------------------------------------------------- packing */

sasq_status sasq_pack_weights(const int8_t *b, int64_t n, int64_t k, sasq_packed *out) {
    memset(out, 0, sizeof *out);
    if (n <= 0 || k <= 0 || k > SASQ_MAX_K) return SASQ_ERR_ARG;
    int64_t kp = (k + 3) & ~(int64_t)3, np = (n + SASQ_NR - 1) / SASQ_NR;
    size_t bytes = (size_t)(np * kp * SASQ_NR);
    int8_t *data = aligned_alloc(64, bytes); /* bytes is a multiple of 64 */
    int32_t *corr = aligned_alloc(64, (size_t)np * SASQ_NR * sizeof(int32_t));
    if (!data || !corr) {
        free(data);
        free(corr);
        return SASQ_ERR_NOMEM;
    }
    memset(data, 0, bytes);
    memset(corr, 0, (size_t)np * SASQ_NR * sizeof(int32_t));
    for (int64_t j = 0; j < n; j++) {
        int8_t *panel = data + (j / SASQ_NR) * kp * SASQ_NR;
        int64_t col = j % SASQ_NR, sum = 0;
        const int8_t *row = b + j * k;
        for (int64_t kk = 0; kk < k; kk++) {
            panel[(kk / 4) * (4 * SASQ_NR) + col * 4 + (kk % 4)] = row[kk];
            sum += row[kk];
        }
        corr[j] = (int32_t)(128 * sum); /* |128 * sum| <= 2^14 * K < 2^31 */
    }
    out->n = n;
    out->k = k;
    out->kp = kp;
    out->n_panels = np;
    out->data = data;
    out->corr = corr;
    return SASQ_OK;
}

void sasq_packed_free(sasq_packed *p) {
    free(p->data);
    free(p->corr);
    p->data = NULL;
    p->corr = NULL;
}

/* ---------------------------------------------------------------- job description */

typedef struct {
    const sasq_packed *p;
    int64_t m, nmb;       /* rows, row blocks */
    const int8_t *a;      /* original activations (scalar tier) */
    const void *a_conv;   /* u8 tile-major (VNNI) or int16 rows of kp (AVX2) copy of a */
    int32_t *ci;          /* int32 output, or NULL */
    float *cf;            /* float output, or NULL */
    const float *comb;    /* a_scale * w_scales[n], padded to whole panels (float output) */
} job_t;

/* ---------------------------------------------------------------- scalar tier */

static void task_scalar(void *vctx, int64_t t) {
    const job_t *J = vctx;
    const sasq_packed *P = J->p;
    int64_t mb = t / P->n_panels, pn = t % P->n_panels;
    int64_t m0 = mb * MC, m1 = m0 + MC < J->m ? m0 + MC : J->m;
    const int8_t *panel = P->data + pn * P->kp * SASQ_NR;
    int64_t n0 = pn * SASQ_NR, ncols = P->n - n0 < SASQ_NR ? P->n - n0 : SASQ_NR;
    for (int64_t i = m0; i < m1; i++) {
        const int8_t *ar = J->a + i * P->k;
        for (int64_t col = 0; col < ncols; col++) {
            int32_t acc = 0; /* partial sums are bounded by the final bound: no overflow */
            for (int64_t kk = 0; kk < P->k; kk++)
                acc += (int32_t)ar[kk] * (int32_t)panel[(kk / 4) * (4 * SASQ_NR) + col * 4 + kk % 4];
            if (J->ci) J->ci[i * P->n + n0 + col] = acc;
            else J->cf[i * P->n + n0 + col] = (float)acc * J->comb[n0 + col];
        }
    }
}

#if HAVE_X86
/* ---------------------------------------------------------------- AVX2 tier */

INLINE TARGET_AVX2 void avx2_tile(int mr, const int16_t *A, int64_t kp, const int8_t *B,
                                  int32_t *ci, float *cf, int64_t ldc, const float *comb,
                                  int ncols) {
    __m256i lo[MR_AVX2], hi[MR_AVX2];
    for (int i = 0; i < mr; i++) lo[i] = hi[i] = _mm256_setzero_si256();
    for (int64_t g = 0; g < kp / 4; g++) {
        const int8_t *bg = B + g * (4 * SASQ_NR);
        __m256i b_lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)bg));
        __m256i b_hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(bg + 16)));
        for (int i = 0; i < mr; i++) {
            long long a4;
            memcpy(&a4, A + i * kp + 4 * g, 8);
            __m256i av = _mm256_set1_epi64x(a4);
            lo[i] = _mm256_add_epi32(lo[i], _mm256_madd_epi16(av, b_lo));
            hi[i] = _mm256_add_epi32(hi[i], _mm256_madd_epi16(av, b_hi));
        }
    }
    for (int i = 0; i < mr; i++) {
        /* lanes hold (k0+k1, k2+k3) pairs per column: add the pairs, restore column order */
        __m256i s = _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo[i], hi[i]), 0xD8);
        int32_t tmp[8];
        if (ci) {
            if (ncols == 8) _mm256_storeu_si256((__m256i *)(ci + i * ldc), s);
            else {
                _mm256_storeu_si256((__m256i *)tmp, s);
                memcpy(ci + i * ldc, tmp, (size_t)ncols * sizeof(int32_t));
            }
        } else {
            __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_loadu_ps(comb));
            if (ncols == 8) _mm256_storeu_ps(cf + i * ldc, f);
            else {
                float ft[8];
                _mm256_storeu_ps(ft, f);
                memcpy(cf + i * ldc, ft, (size_t)ncols * sizeof(float));
            }
        }
    }
}

TARGET_AVX2 static void task_avx2(void *vctx, int64_t t) {
    const job_t *J = vctx;
    const sasq_packed *P = J->p;
    int64_t mb = t / P->n_panels, pn = t % P->n_panels;
    int64_t m0 = mb * MC, m1 = m0 + MC < J->m ? m0 + MC : J->m;
    const int8_t *panel = P->data + pn * P->kp * SASQ_NR;
    int64_t n0 = pn * SASQ_NR;
    const int16_t *A = J->a_conv;
    for (int64_t i = m0; i < m1; i += MR_AVX2) {
        int mr = m1 - i < MR_AVX2 ? (int)(m1 - i) : MR_AVX2;
        for (int sb = 0; sb < SASQ_NR / 8; sb++) {
            int64_t c0 = n0 + sb * 8;
            if (c0 >= P->n) break;
            int ncols = P->n - c0 < 8 ? (int)(P->n - c0) : 8;
            int32_t *ci = J->ci ? J->ci + i * P->n + c0 : NULL;
            float *cf = J->cf ? J->cf + i * P->n + c0 : NULL;
            const float *comb = J->comb ? J->comb + c0 : NULL;
            const int16_t *Ai = A + i * P->kp;
            const int8_t *B = panel + sb * 32;
            switch (mr) { /* constant mr: the tile is fully unrolled in registers */
            case 4: avx2_tile(4, Ai, P->kp, B, ci, cf, P->n, comb, ncols); break;
            case 3: avx2_tile(3, Ai, P->kp, B, ci, cf, P->n, comb, ncols); break;
            case 2: avx2_tile(2, Ai, P->kp, B, ci, cf, P->n, comb, ncols); break;
            default: avx2_tile(1, Ai, P->kp, B, ci, cf, P->n, comb, ncols); break;
            }
        }
    }
}

/* ---------------------------------------------------------------- AVX-512 VNNI tier */

INLINE TARGET_VNNI __mmask16 edge_mask(int ncols, int j) {
    int left = ncols - 16 * j;
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* Broadcast 4 activation bytes of row r at k-group g. */
/* A is packed tile-major: the 4 bytes of tile row r at k-group g sit at A + 24 g + 4 r, so a
 * K block of a tile is one contiguous run (no row stride, no TLB or L1-set pressure). */
#define BCAST(r) _mm512_set1_epi32(load_u32(A + (4 * MR_VNNI) * g + 4 * (r)))
#define DP4(r)                                                                                   \
    do {                                                                                         \
        __m512i av_ = BCAST(r);                                                                  \
        c##r##0 = _mm512_dpbusd_epi32(c##r##0, av_, b0);                                         \
        c##r##1 = _mm512_dpbusd_epi32(c##r##1, av_, b1);                                         \
        c##r##2 = _mm512_dpbusd_epi32(c##r##2, av_, b2);                                         \
        c##r##3 = _mm512_dpbusd_epi32(c##r##3, av_, b3);                                         \
    } while (0)
#define INIT4(r) __m512i c##r##0 = n0v, c##r##1 = n1v, c##r##2 = n2v, c##r##3 = n3v
/* Store row r (masked at the right edge of N); the float form converts and scales in place. */
#define STORE4(r)                                                                                \
    do {                                                                                         \
        if ((r) < mr) {                                                                          \
            if (ci) {                                                                            \
                int32_t *p_ = ci + (r) * ldc;                                                    \
                _mm512_mask_storeu_epi32(p_, m0k, c##r##0);                                      \
                _mm512_mask_storeu_epi32(p_ + 16, m1k, c##r##1);                                 \
                _mm512_mask_storeu_epi32(p_ + 32, m2k, c##r##2);                                 \
                _mm512_mask_storeu_epi32(p_ + 48, m3k, c##r##3);                                 \
            } else {                                                                             \
                float *p_ = cf + (r) * ldc;                                                      \
                _mm512_mask_storeu_ps(p_, m0k, _mm512_mul_ps(_mm512_cvtepi32_ps(c##r##0), s0));  \
                _mm512_mask_storeu_ps(p_ + 16, m1k, _mm512_mul_ps(_mm512_cvtepi32_ps(c##r##1), s1)); \
                _mm512_mask_storeu_ps(p_ + 32, m2k, _mm512_mul_ps(_mm512_cvtepi32_ps(c##r##2), s2)); \
                _mm512_mask_storeu_ps(p_ + 48, m3k, _mm512_mul_ps(_mm512_cvtepi32_ps(c##r##3), s3)); \
            }                                                                                    \
        }                                                                                        \
    } while (0)
#define STORE_PREP                                                                               \
    __mmask16 m0k = edge_mask(ncols, 0), m1k = edge_mask(ncols, 1), m2k = edge_mask(ncols, 2),   \
              m3k = edge_mask(ncols, 3);                                                         \
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;                                  \
    if (comb) { /* padded to whole panels: full loads stay in bounds */                          \
        s0 = _mm512_loadu_ps(comb); s1 = _mm512_loadu_ps(comb + 16);                             \
        s2 = _mm512_loadu_ps(comb + 32); s3 = _mm512_loadu_ps(comb + 48);                        \
    }

static inline uint32_t load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Accumulators of one 6-row tile live in registers for one K block; between K blocks they park in
 * the task's scratch (row r at acc + 64 r). The first block starts them at -128 * rowsum(W). */
#define LOAD4(r)                                                                                 \
    if (first) { c##r##0 = n0v; c##r##1 = n1v; c##r##2 = n2v; c##r##3 = n3v; }                  \
    else {                                                                                       \
        c##r##0 = _mm512_load_si512(acc + 64 * (r));                                             \
        c##r##1 = _mm512_load_si512(acc + 64 * (r) + 16);                                        \
        c##r##2 = _mm512_load_si512(acc + 64 * (r) + 32);                                        \
        c##r##3 = _mm512_load_si512(acc + 64 * (r) + 48);                                        \
    }
#define PARK4(r)                                                                                 \
    do {                                                                                         \
        _mm512_store_si512(acc + 64 * (r), c##r##0);                                             \
        _mm512_store_si512(acc + 64 * (r) + 16, c##r##1);                                        \
        _mm512_store_si512(acc + 64 * (r) + 32, c##r##2);                                        \
        _mm512_store_si512(acc + 64 * (r) + 48, c##r##3);                                        \
    } while (0)
#define NEG_CORR                                                                                 \
    const __m512i z = _mm512_setzero_si512();                                                    \
    const __m512i n0v = _mm512_sub_epi32(z, _mm512_load_si512(corr)),                            \
                  n1v = _mm512_sub_epi32(z, _mm512_load_si512(corr + 16)),                       \
                  n2v = _mm512_sub_epi32(z, _mm512_load_si512(corr + 32)),                       \
                  n3v = _mm512_sub_epi32(z, _mm512_load_si512(corr + 48))

/* 6 rows x 64 columns, k-groups [g0, g1): 24 zmm accumulators. Rows >= mr of A are zero padding
 * (the activation buffer is allocated in whole tiles) and are never stored. */
TARGET_VNNI static void vnni_tile6(int mr, const uint8_t *A, const int8_t *B,
                                   int64_t g0, int64_t g1, const int32_t *corr, int32_t *acc,
                                   int first, int last, int32_t *ci, float *cf, int64_t ldc,
                                   const float *comb, int ncols) {
    NEG_CORR;
    __m512i c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33, c40,
        c41, c42, c43, c50, c51, c52, c53;
    LOAD4(0) LOAD4(1) LOAD4(2) LOAD4(3) LOAD4(4) LOAD4(5)
    for (int64_t g = g0; g < g1; g++) {
        const int8_t *bg = B + g * (4 * SASQ_NR);
        __m512i b0 = _mm512_load_si512(bg), b1 = _mm512_load_si512(bg + 64);
        __m512i b2 = _mm512_load_si512(bg + 128), b3 = _mm512_load_si512(bg + 192);
        DP4(0); DP4(1); DP4(2); DP4(3); DP4(4); DP4(5);
    }
    if (!last) {
        PARK4(0); PARK4(1); PARK4(2); PARK4(3); PARK4(4); PARK4(5);
        return;
    }
    STORE_PREP
    STORE4(0); STORE4(1); STORE4(2); STORE4(3); STORE4(4); STORE4(5);
}

/* 1 row x 64 columns (decode, M = 1): memory-bound. Two accumulator sets (even / odd k-groups)
 * keep 8 loads in flight per step; they are summed before parking or storing. */
TARGET_VNNI static void vnni_tile1(const uint8_t *A, const int8_t *B, int64_t g0,
                                   int64_t g1, const int32_t *corr, int32_t *acc, int first,
                                   int last, int32_t *ci, float *cf, int64_t ldc,
                                   const float *comb, int ncols) {
    const int mr = 1;
    NEG_CORR;
    __m512i c00, c01, c02, c03;
    LOAD4(0)
    __m512i e0 = z, e1 = z, e2 = z, e3 = z;
    int64_t g = g0;
    for (; g + 2 <= g1; g += 2) {
        const int8_t *bg = B + g * (4 * SASQ_NR);
        __m512i av = BCAST(0), aw = _mm512_set1_epi32(load_u32(A + (4 * MR_VNNI) * (g + 1)));
        c00 = _mm512_dpbusd_epi32(c00, av, _mm512_load_si512(bg));
        c01 = _mm512_dpbusd_epi32(c01, av, _mm512_load_si512(bg + 64));
        c02 = _mm512_dpbusd_epi32(c02, av, _mm512_load_si512(bg + 128));
        c03 = _mm512_dpbusd_epi32(c03, av, _mm512_load_si512(bg + 192));
        e0 = _mm512_dpbusd_epi32(e0, aw, _mm512_load_si512(bg + 256));
        e1 = _mm512_dpbusd_epi32(e1, aw, _mm512_load_si512(bg + 320));
        e2 = _mm512_dpbusd_epi32(e2, aw, _mm512_load_si512(bg + 384));
        e3 = _mm512_dpbusd_epi32(e3, aw, _mm512_load_si512(bg + 448));
    }
    for (; g < g1; g++) {
        const int8_t *bg = B + g * (4 * SASQ_NR);
        __m512i b0 = _mm512_load_si512(bg), b1 = _mm512_load_si512(bg + 64);
        __m512i b2 = _mm512_load_si512(bg + 128), b3 = _mm512_load_si512(bg + 192);
        DP4(0);
    }
    c00 = _mm512_add_epi32(c00, e0);
    c01 = _mm512_add_epi32(c01, e1);
    c02 = _mm512_add_epi32(c02, e2);
    c03 = _mm512_add_epi32(c03, e3);
    if (!last) {
        PARK4(0);
        return;
    }
    STORE_PREP
    STORE4(0);
}

/* K is cut into blocks of KC_GROUPS k-groups so that the block's slice of the weight panel
 * (64 x 4 * KC_GROUPS bytes = 16 KiB) stays in L1 while every 6-row tile of the task uses it. */
#define KC_GROUPS 64

TARGET_VNNI static void task_vnni(void *vctx, int64_t t) {
    const job_t *J = vctx;
    const sasq_packed *P = J->p;
    int64_t mb = t / P->n_panels, pn = t % P->n_panels;
    int64_t m0 = mb * MC, m1 = m0 + MC < J->m ? m0 + MC : J->m;
    const int8_t *B = P->data + pn * P->kp * SASQ_NR;
    const int32_t *corr = P->corr + pn * SASQ_NR;
    int64_t n0 = pn * SASQ_NR, ng = P->kp / 4;
    int ncols = P->n - n0 < SASQ_NR ? (int)(P->n - n0) : SASQ_NR;
    const uint8_t *A = J->a_conv;
    _Alignas(64) int32_t scratch[(MC + MR_VNNI) * SASQ_NR]; /* parked accumulators, 26 KiB */
    /* a single tile reuses nothing across tiles: one K block, no parking */
    const int64_t kcg = m1 - m0 <= MR_VNNI ? ng : KC_GROUPS;
    for (int64_t g0 = 0; g0 < ng; g0 += kcg) {
        int64_t g1 = g0 + kcg < ng ? g0 + kcg : ng;
        int first = g0 == 0, last = g1 == ng;
        for (int64_t i = m0; i < m1; i += MR_VNNI) {
            int mr = m1 - i < MR_VNNI ? (int)(m1 - i) : MR_VNNI;
            const uint8_t *Ai = A + (i / MR_VNNI) * ng * (4 * MR_VNNI); /* m0 % 6 == 0 */
            int32_t *acc = scratch + (i - m0) * SASQ_NR;
            int32_t *ci = J->ci ? J->ci + i * P->n + n0 : NULL;
            float *cf = J->cf ? J->cf + i * P->n + n0 : NULL;
            const float *comb = J->comb ? J->comb + n0 : NULL;
            /* pull the weight slice two K blocks ahead (16 KiB) into L2 while this block
             * computes, each tile of the block fetching its share: on its own the first tile of
             * a block would wait on memory for every line */
            int64_t gp = g1 + KC_GROUPS;
            if (gp < ng && m1 - m0 > MR_VNNI) { /* one tile streams: hardware prefetch suffices */
                int64_t span = (gp + KC_GROUPS < ng ? KC_GROUPS : ng - gp) * (4 * SASQ_NR);
                int64_t ntile = (m1 - m0 + MR_VNNI - 1) / MR_VNNI, ti = (i - m0) / MR_VNNI;
                int64_t lo = span * ti / ntile, hi = span * (ti + 1) / ntile;
                for (int64_t off = lo & ~(int64_t)63; off < hi; off += 64)
                    _mm_prefetch((const char *)(B + gp * (4 * SASQ_NR) + off), _MM_HINT_T1);
            }
            if (mr == 1) vnni_tile1(Ai, B, g0, g1, corr, acc, first, last, ci, cf, P->n, comb, ncols);
            else vnni_tile6(mr, Ai, B, g0, g1, corr, acc, first, last, ci, cf, P->n, comb, ncols);
        }
    }
}
#endif /* HAVE_X86 */

/* ---------------------------------------------------------------- driver */

/* VNNI activation copy: a + 128 as u8, tile-major [tile][k-group][row][4]. */
typedef struct { const int8_t *a; uint8_t *u; int64_t m, k, tstride; } conv_job;
static void conv_task(void *vctx, int64_t tile) {
    const conv_job *C = vctx;
    for (int64_t i = tile * MR_VNNI; i < C->m && i < (tile + 1) * MR_VNNI; i++) {
        uint8_t *dst = C->u + tile * C->tstride + 4 * (i % MR_VNNI);
        const int8_t *src = C->a + i * C->k;
        for (int64_t kk = 0; kk < C->k; kk++)
            dst[(kk / 4) * (4 * MR_VNNI) + (kk % 4)] = (uint8_t)((int)src[kk] + 128);
    }
}

static sasq_status gemm_run(const int8_t *a, int64_t m, const sasq_packed *p, int32_t *ci,
                            float *cf, const float *comb) {
    if (m <= 0 || !p->data) return SASQ_ERR_ARG;
    job_t J = {p, m, (m + MC - 1) / MC, a, NULL, ci, cf, comb};
    sasq_task_fn fn = task_scalar;
    void *conv = NULL;
    sasq_isa isa = sasq_get_isa();
    const int64_t kp = p->kp, k = p->k;
#if HAVE_X86
    if (isa == SASQ_ISA_AVX512VNNI) {
        /* tile-major u8 copy: [tile of 6 rows][k-group][row][4 bytes]; rows past m and k past K
         * stay zero (any activation times a zero weight adds nothing) */
        int64_t ng = kp / 4, ntiles = (m + MR_VNNI - 1) / MR_VNNI, tstride = ng * 4 * MR_VNNI;
        uint8_t *u = calloc((size_t)(ntiles * tstride), 1);
        if (!u) return SASQ_ERR_NOMEM;
        conv_job cj = {a, u, m, k, tstride};
        sasq_parallel_for(ntiles, conv_task, &cj); /* one tile (6 rows) per task */
        conv = u;
        fn = task_vnni;
    } else if (isa == SASQ_ISA_AVX2) {
        int16_t *w = calloc((size_t)(m * kp), sizeof(int16_t));
        if (!w) return SASQ_ERR_NOMEM;
        for (int64_t i = 0; i < m; i++)
            for (int64_t kk = 0; kk < k; kk++) w[i * kp + kk] = a[i * k + kk];
        conv = w;
        fn = task_avx2;
    }
#else
    (void)isa; (void)kp; (void)k;
#endif
    J.a_conv = conv;
    sasq_parallel_for_max(J.nmb * p->n_panels, fn, &J, sasq_gemm_threads(m, p->n, p->k));
    free(conv);
    return SASQ_OK;
}

/* Thread-count policy per shape. A thread pays for itself with a few million multiply-adds of
 * work (waking it and handing out tasks costs microseconds). Measured on a 16-core Xeon
 * (benchmarks/thread_scaling.py): M=1 576x1536 gets slower with every added thread (101 GOP/s on
 * 1, 30 on 16), M=16 576x1536 peaks at 8 threads, M=64 at 8, M=256 at 16: about 4M multiply-adds
 * per thread. Decode (M <= 8) is bound by reading the weights: there a thread needs ~1 MiB of them
 * (M=1 4096x4096 scales to 16 threads, 576x1536 = 0.9 MiB stays on one). */
#define GEMM_MACS_PER_THREAD (1LL << 22)
#define GEMM_BYTES_PER_THREAD (1LL << 20)
static int gemm_policy_on = 1; /* benchmarks switch it off to measure what the policy saves */
void sasq_gemm_policy(int on) { gemm_policy_on = on; }
int sasq_gemm_threads(int64_t m, int64_t n, int64_t k) {
    if (!gemm_policy_on) return sasq_get_num_threads();
    int64_t by_work = m * n * k / GEMM_MACS_PER_THREAD;
    int64_t by_bytes = m <= 8 ? n * k / GEMM_BYTES_PER_THREAD : by_work;
    int64_t t = by_work > by_bytes ? by_work : by_bytes;
    int nt = sasq_get_num_threads();
    return t < 1 ? 1 : (t > nt ? nt : (int)t);
}

sasq_status sasq_gemm_packed_i32(const int8_t *a, int64_t m, const sasq_packed *p, int32_t *c) {
    return gemm_run(a, m, p, c, NULL, NULL);
}

sasq_status sasq_gemm_packed_f32(const int8_t *a, int64_t m, const sasq_packed *p, float a_scale,
                                 const float *w_scales, float *y) {
    /* combined scales, padded to whole panels so SIMD loads stay in bounds */
    float *comb = calloc((size_t)(p->n_panels * SASQ_NR), sizeof(float));
    if (!comb) return SASQ_ERR_NOMEM;
    for (int64_t j = 0; j < p->n; j++) {
        comb[j] = a_scale * w_scales[j];
        if (!sasq_linear_scale_ok(comb[j], p->k)) { /* overflow, underflow, NaN: refuse */
            free(comb);
            return SASQ_ERR_ARG;
        }
    }
    sasq_status st = gemm_run(a, m, p, NULL, y, comb);
    free(comb);
    return st;
}

typedef struct {
    float *y;
    const float *a_scales;
    int64_t m, n, rpc;
} rows_job;

static void rows_task(void *vctx, int64_t t) {
    const rows_job *J = vctx;
    int64_t r0 = t * J->rpc, r1 = r0 + J->rpc < J->m ? r0 + J->rpc : J->m;
    for (int64_t i = r0; i < r1; i++) {
        float s = J->a_scales[i], *yr = J->y + i * J->n;
        for (int64_t j = 0; j < J->n; j++) yr[j] *= s;
    }
}

sasq_status sasq_gemm_packed_f32_rows(const int8_t *a, int64_t m, const sasq_packed *p,
                                      const float *a_scales, const float *w_scales, float *y) {
    float amin = FLT_MAX, amax = 0.0f, wmin = FLT_MAX, wmax = 0.0f;
    for (int64_t i = 0; i < m; i++) {
        if (!(a_scales[i] > 0.0f && a_scales[i] <= FLT_MAX)) return SASQ_ERR_ARG;
        amin = a_scales[i] < amin ? a_scales[i] : amin;
        amax = a_scales[i] > amax ? a_scales[i] : amax;
    }
    for (int64_t j = 0; j < p->n; j++) {
        wmin = w_scales[j] < wmin ? w_scales[j] : wmin;
        wmax = w_scales[j] > wmax ? w_scales[j] : wmax;
    }
    /* float products are monotone: the extremes bound every a_scales[i] * w_scales[n] */
    if (!sasq_linear_scale_ok(amin * wmin, p->k) || !sasq_linear_scale_ok(amax * wmax, p->k))
        return SASQ_ERR_ARG;
    sasq_status st = sasq_gemm_packed_f32(a, m, p, 1.0f, w_scales, y);
    if (st != SASQ_OK) return st;
    rows_job J = {y, a_scales, m, p->n, sasq_chunk_rows(m, p->n)};
    sasq_parallel_for((m + J.rpc - 1) / J.rpc, rows_task, &J);
    return SASQ_OK;
}

/* ---------------------------------------------------------------- measurement helpers */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#if HAVE_X86
/* 16 independent vpdpbusd chains (more than latency x throughput), no memory traffic. The asm
 * barrier hides the chains' values from the compiler so it cannot merge identical chains. */
#define PEAK_CHAINS 16
TARGET_VNNI static int64_t peak_loop(int64_t iters, int32_t seed) {
    __m512i a = _mm512_set1_epi32(seed), b = _mm512_set1_epi32(seed ^ 0x01020304);
    __m512i c0 = _mm512_set1_epi32(0), c1 = _mm512_set1_epi32(1), c2 = _mm512_set1_epi32(2),
            c3 = _mm512_set1_epi32(3), c4 = _mm512_set1_epi32(4), c5 = _mm512_set1_epi32(5),
            c6 = _mm512_set1_epi32(6), c7 = _mm512_set1_epi32(7), c8 = _mm512_set1_epi32(8),
            c9 = _mm512_set1_epi32(9), c10 = _mm512_set1_epi32(10), c11 = _mm512_set1_epi32(11),
            c12 = _mm512_set1_epi32(12), c13 = _mm512_set1_epi32(13), c14 = _mm512_set1_epi32(14),
            c15 = _mm512_set1_epi32(15);
    for (int64_t i = 0; i < iters; i++) {
        c0 = _mm512_dpbusd_epi32(c0, a, b); c1 = _mm512_dpbusd_epi32(c1, a, b);
        c2 = _mm512_dpbusd_epi32(c2, a, b); c3 = _mm512_dpbusd_epi32(c3, a, b);
        c4 = _mm512_dpbusd_epi32(c4, a, b); c5 = _mm512_dpbusd_epi32(c5, a, b);
        c6 = _mm512_dpbusd_epi32(c6, a, b); c7 = _mm512_dpbusd_epi32(c7, a, b);
        c8 = _mm512_dpbusd_epi32(c8, a, b); c9 = _mm512_dpbusd_epi32(c9, a, b);
        c10 = _mm512_dpbusd_epi32(c10, a, b); c11 = _mm512_dpbusd_epi32(c11, a, b);
        c12 = _mm512_dpbusd_epi32(c12, a, b); c13 = _mm512_dpbusd_epi32(c13, a, b);
        c14 = _mm512_dpbusd_epi32(c14, a, b); c15 = _mm512_dpbusd_epi32(c15, a, b);
        __asm__ volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5),
                         "+v"(c6), "+v"(c7));
        __asm__ volatile("" : "+v"(c8), "+v"(c9), "+v"(c10), "+v"(c11), "+v"(c12), "+v"(c13),
                         "+v"(c14), "+v"(c15));
    }
    __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                                 _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)));
    s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11)));
    s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(c12, c13), _mm512_add_epi32(c14, c15)));
    uint32_t lanes[16]; /* wrapping sum: _mm512_reduce_add_epi32 would overflow signed int */
    _mm512_storeu_si512(lanes, s);
    uint32_t r = 0;
    for (int i = 0; i < 16; i++) r += lanes[i];
    return (int64_t)r;
}
#define PEAK_OPS_PER_ITER (PEAK_CHAINS * 64.0 * 2.0) /* instructions x 64 u8*s8 MACs x 2 ops */

static double thread_cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct { int64_t iters; int64_t sink; int64_t cpu_ns; } peak_job;
static void peak_task(void *vctx, int64_t t) {
    peak_job *J = vctx;
    double c0 = thread_cpu_s();
    __atomic_fetch_add(&J->sink, peak_loop(J->iters, (int32_t)t + 7), __ATOMIC_RELAXED);
    __atomic_fetch_add(&J->cpu_ns, (int64_t)((thread_cpu_s() - c0) * 1e9), __ATOMIC_RELAXED);
}
#endif

double sasq_peak_int8_gops(int threads, double seconds, double *cpu_gops) {
    if (cpu_gops) *cpu_gops = 0.0;
#if HAVE_X86
    if (!sasq_isa_available(SASQ_ISA_AVX512VNNI) || threads < 1) return 0.0;
    int saved = sasq_get_num_threads();
    if (sasq_set_num_threads(threads) != 0) return 0.0;
    peak_job J = {1 << 16, 0, 0};
    double t0 = now_s();
    peak_task(&J, 0); /* calibrate the iteration count on one thread */
    double dt = now_s() - t0;
    if (dt > 0) J.iters = (int64_t)((double)J.iters * seconds / dt) + 1;
    J.cpu_ns = 0;
    t0 = now_s();
    sasq_parallel_for(threads, peak_task, &J);
    dt = now_s() - t0;
    sasq_set_num_threads(saved);
    double ops = PEAK_OPS_PER_ITER * (double)J.iters * threads;
    /* per-thread CPU time: the rate while actually on a core (shared machines deschedule us) */
    if (cpu_gops && J.cpu_ns > 0) *cpu_gops = ops / (1e-9 * (double)J.cpu_ns / threads) * 1e-9;
    return ops / dt * 1e-9;
#else
    (void)threads; (void)seconds;
    return 0.0;
#endif
}

typedef struct { const sasq_packed *p; uint64_t acc; } stream_job;
typedef uint64_t __attribute__((may_alias)) u64_alias; /* reads the int8 buffer as words */
static void stream_task(void *vctx, int64_t t) {
    stream_job *J = vctx;
    const u64_alias *w = (const u64_alias *)(J->p->data + t * J->p->kp * SASQ_NR);
    int64_t n = J->p->kp * SASQ_NR / 8; /* a multiple of 32 */
    uint64_t x0 = 0, x1 = 0, x2 = 0, x3 = 0;
    for (int64_t i = 0; i < n; i += 4) {
        x0 ^= w[i]; x1 ^= w[i + 1]; x2 ^= w[i + 2]; x3 ^= w[i + 3];
    }
    __atomic_fetch_xor(&J->acc, x0 ^ x1 ^ x2 ^ x3, __ATOMIC_RELAXED);
}

int64_t sasq_stream_read(const sasq_packed *p) {
    stream_job J = {p, 0};
    sasq_parallel_for(p->n_panels, stream_task, &J);
    return (int64_t)(J.acc & 0x7fffffffffffffffULL);
}
