/* Linear layers, batched matmul and fused attention (fp32). */
#include <math.h>
#include "gr_kernels.h"

void gr_linear_f32(const float *x, const float *w, const float *b, float *y,
                   int32_t m, int32_t k, int32_t n, float lo, float hi) {
    int32_t i, j, t;
    for (i = 0; i < m; i++) {
        const float *xi = x + (size_t)i * k;
        for (j = 0; j < n; j++) {
            const float *wj = w + (size_t)j * k;
            float acc = b ? b[j] : 0.0f;
            for (t = 0; t < k; t++) acc = GR_FMA(xi[t], wj[t], acc);
            y[(size_t)i * n + j] = acc < lo ? lo : (acc > hi ? hi : acc);
        }
    }
}

void gr_bmm_f32(int32_t b1, int32_t b2, int32_t m, int32_t k, int32_t n,
                const float *a, const int32_t *as, const float *b, const int32_t *bs, float *y) {
    int32_t p, q, i, j, t;
    for (p = 0; p < b1; p++) for (q = 0; q < b2; q++) {
        const float *ab = a + (size_t)p * as[0] + (size_t)q * as[1];
        const float *bb = b + (size_t)p * bs[0] + (size_t)q * bs[1];
        float *yb = y + ((size_t)p * b2 + q) * m * n;
        for (i = 0; i < m; i++) for (j = 0; j < n; j++) {
            float acc = 0.0f;
            for (t = 0; t < k; t++) acc += ab[i * as[2] + t * as[3]] * bb[t * bs[2] + j * bs[3]];
            yb[(size_t)i * n + j] = acc;
        }
    }
}

void gr_sdpa_f32(int32_t b1, int32_t b2, int32_t t, int32_t s, int32_t d, int32_t dv,
                 const float *q, const int32_t *qs, const float *k, const int32_t *ks,
                 const float *v, const int32_t *vs, const float *mask, const int32_t *ms,
                 float *y, const int32_t *ys, float scale, int32_t causal, float *scratch) {
    int32_t p, h, i, j, c;
    for (p = 0; p < b1; p++) for (h = 0; h < b2; h++) {
        const float *qb = q + (size_t)p * qs[0] + (size_t)h * qs[1];
        const float *kb = k + (size_t)p * ks[0] + (size_t)h * ks[1];
        const float *vb = v + (size_t)p * vs[0] + (size_t)h * vs[1];
        float *yb = y + (size_t)p * ys[0] + (size_t)h * ys[1];
        for (i = 0; i < t; i++) {
            /* causal masking is aligned to the top-left, as torch's is_causal */
            int32_t last = causal ? (i < s ? i + 1 : s) : s;
            float mx = -INFINITY, sum = 0.0f;
            for (j = 0; j < last; j++) {
                float acc = 0.0f;
                for (c = 0; c < d; c++) acc += qb[i * qs[2] + c * qs[3]] * kb[j * ks[2] + c * ks[3]];
                acc *= scale;
                if (mask) acc += mask[(size_t)p * ms[0] + (size_t)h * ms[1] + (size_t)i * ms[2] + (size_t)j * ms[3]];
                scratch[j] = acc;
                if (acc > mx) mx = acc;
            }
            for (j = 0; j < last; j++) { scratch[j] = expf(scratch[j] - mx); sum += scratch[j]; }
            sum = 1.0f / sum;
            for (c = 0; c < dv; c++) {
                float acc = 0.0f;
                for (j = 0; j < last; j++) acc += scratch[j] * vb[j * vs[2] + c * vs[3]];
                yb[(size_t)i * ys[2] + c] = acc * sum;
            }
        }
    }
}
