/* int8 training kernels (see gr_train.h): fp32 gradients through int8 weights and
   int8 saved activations, and the integer SGD update with QAS. Every reduction runs in
   one fixed sequential order; backends/mcu/train_reference.py mirrors these loops
   operation for operation, which is what makes the int8 step checkable bit for bit.
   (The int8-input weight gradient shares gr_train.c's loop: gr_conv2d_bwd_weight_xs8_f32.) */
#include <math.h>
#include <string.h>
#include "gr_train.h"

#define GR_DQ(q, zp, s) (((float)(q) - (float)(zp)) * (s))

void gr_conv2d_bwd_input_ws8_f32(const gr_conv_shape *s, const float *gy, const int8_t *w, const float *ws,
                                 int32_t o0, int32_t o1, int32_t accumulate, float *gx) {
    /* Scatter per (oc, ky, kx): each input element gets at most one term from each, so
       its terms are added in (oc, ky, kx) order, the order the reference sums in. */
    const int32_t cpg = s->c / s->groups, opg = s->oc / s->groups, khw = s->kh * s->kw;
    const size_t hw = (size_t)s->h * s->w, ohw = (size_t)s->oh * s->ow;
    const int pointwise = khw == 1 && s->sh == 1 && s->sw == 1 && s->ph == 0 && s->pw == 0;
    for (int32_t n = 0; n < s->n; n++)
        for (int32_t c = 0; c < s->c; c++) {
            const int32_t g = c / cpg, ic = c % cpg;
            const int32_t lo = g * opg > o0 ? g * opg : o0, hi = (g + 1) * opg < o1 ? (g + 1) * opg : o1;
            float *gxp = gx + ((size_t)n * s->c + c) * hw;
            if (!accumulate) memset(gxp, 0, sizeof(float) * hw);
            int32_t oc = lo;
            if (pointwise)  /* four output channels per pass: the same order per element */
                for (; oc + 4 <= hi; oc += 4) {
                    const int8_t *wp = w + (size_t)(oc - o0) * cpg + ic;
                    const float w0 = (float)wp[0] * ws[oc], w1 = (float)wp[cpg] * ws[oc + 1];
                    const float w2 = (float)wp[2 * cpg] * ws[oc + 2], w3 = (float)wp[3 * cpg] * ws[oc + 3];
                    const float *g0 = gy + ((size_t)n * s->oc + oc) * ohw;
                    const float *g1 = g0 + ohw, *g2 = g1 + ohw, *g3 = g2 + ohw;
                    for (size_t p = 0; p < hw; p++) {
                        float v = gxp[p];
                        v += g0[p] * w0;
                        v += g1[p] * w1;
                        v += g2[p] * w2;
                        v += g3[p] * w3;
                        gxp[p] = v;
                    }
                }
            for (; oc < hi; oc++) {
                const float *gyp = gy + ((size_t)n * s->oc + oc) * ohw;
                const int8_t *wp = w + ((size_t)(oc - o0) * cpg + ic) * khw;
                for (int32_t ky = 0; ky < s->kh; ky++)
                    for (int32_t kx = 0; kx < s->kw; kx++) {
                        const float wv = (float)wp[ky * s->kw + kx] * ws[oc];
                        for (int32_t oy = 0; oy < s->oh; oy++) {
                            const int32_t iy = oy * s->sh - s->ph + ky * s->dh;
                            if (iy < 0 || iy >= s->h) continue;
                            const float *gyr = gyp + (size_t)oy * s->ow;
                            float *gxr = gxp + (size_t)iy * s->w;
                            for (int32_t ox = 0; ox < s->ow; ox++) {
                                const int32_t ix = ox * s->sw - s->pw + kx * s->dw;
                                if (ix >= 0 && ix < s->w) gxr[ix] += gyr[ox] * wv;
                            }
                        }
                    }
            }
        }
}

void gr_dw_bwd_input_ws8_f32(const gr_conv_shape *s, const float *gy, const int8_t *w, const float *ws,
                             float *gx, float *plane) {
    /* gr_conv2d_bwd_input_ws8_f32's scatter for one depthwise channel at a time, made in
       `plane` and then copied out: gx may be gy (the same terms, in (ky, kx) order) */
    const size_t hw = (size_t)s->h * s->w, ohw = (size_t)s->oh * s->ow;
    for (int32_t n = 0; n < s->n; n++)
        for (int32_t c = 0; c < s->c; c++) {
            const float *gyp = gy + ((size_t)n * s->oc + c) * ohw;
            const int8_t *wp = w + (size_t)c * s->kh * s->kw;
            memset(plane, 0, sizeof(float) * hw);
            for (int32_t ky = 0; ky < s->kh; ky++)
                for (int32_t kx = 0; kx < s->kw; kx++) {
                    const float wv = (float)wp[ky * s->kw + kx] * ws[c];
                    for (int32_t oy = 0; oy < s->oh; oy++) {
                        const int32_t iy = oy * s->sh - s->ph + ky * s->dh;
                        if (iy < 0 || iy >= s->h) continue;
                        const float *gyr = gyp + (size_t)oy * s->ow;
                        float *gxr = plane + (size_t)iy * s->w;
                        for (int32_t ox = 0; ox < s->ow; ox++) {
                            const int32_t ix = ox * s->sw - s->pw + kx * s->dw;
                            if (ix >= 0 && ix < s->w) gxr[ix] += gyr[ox] * wv;
                        }
                    }
                }
            memcpy(gx + ((size_t)n * s->c + c) * hw, plane, sizeof(float) * hw);
        }
}

void gr_ir_bwd_s8_f32(const gr_conv_shape *sp, const float *gy, const int8_t *wp, const int8_t *wp2, int32_t rp,
                      const float *wsp, const uint8_t *bits1, const gr_conv_shape *sd, const int8_t *wd,
                      const float *wsd, float *gbd, const uint8_t *bits2, const gr_conv_shape *se, const int8_t *we,
                      const int8_t *we2, int32_t re, const float *wse, float *gbe, float *gx, float *g3, int32_t k3,
                      float *t1, float *t2) {
    /* One expanded channel c at a time (images inside): its plane of the project conv's
       input gradient (output channels o in order), masked; the depthwise bias gradient;
       the depthwise input gradient (ky, kx, oy, ox), masked; the expand bias gradient; its
       terms of the block's input gradient. Every value is the same float expression, its
       terms added in the same order, as the unfused kernels' (gr_conv2d_bwd_input_ws8_f32,
       gr_masked_grad_f32, gr_conv2d_bwd_bias_f32), so the results are theirs bit for bit.
       A partially trained project / expand weight comes in two parts: its rows below rp / re
       in wp / we, the rest in wp2 / we2. The expand's masked output gradient of channels
       c < k3 (its weight gradient's input when its first k3 filters are trained) is copied
       to g3 ([n, k3, h, w]). */
    const int32_t n = sp->n, ch = sp->c, cout = sp->oc, cin = se->c;
    const size_t hp = (size_t)sp->h * sp->w, hw = (size_t)sd->h * sd->w;
    if (gx) memset(gx, 0, sizeof(float) * (size_t)n * cin * hw);
    for (int32_t c = 0; c < ch; c++) {
        float accd = 0.0f, acce = 0.0f;
        for (int32_t i = 0; i < n; i++) {
            memset(t1, 0, sizeof(float) * hp);
            for (int32_t o = 0; o < cout; o++) {
                const int8_t *wrow = o < rp ? wp + (size_t)o * ch : wp2 + (size_t)(o - rp) * ch;
                const float wv = (float)wrow[c] * wsp[o];
                const float *g = gy + ((size_t)i * cout + o) * hp;
                for (size_t q = 0; q < hp; q++) t1[q] += g[q] * wv;
            }
            const size_t b1 = ((size_t)i * ch + c) * hp;
            for (size_t q = 0; q < hp; q++) {
                const size_t b = b1 + q;
                t1[q] = (bits1[b >> 3] >> (b & 7)) & 1u ? t1[q] : 0.0f;
                accd += t1[q];
            }
            memset(t2, 0, sizeof(float) * hw);
            for (int32_t ky = 0; ky < sd->kh; ky++)
                for (int32_t kx = 0; kx < sd->kw; kx++) {
                    const float wv = (float)wd[((size_t)c * sd->kh + ky) * sd->kw + kx] * wsd[c];
                    for (int32_t oy = 0; oy < sd->oh; oy++) {
                        const int32_t iy = oy * sd->sh - sd->ph + ky * sd->dh;
                        if (iy < 0 || iy >= sd->h) continue;
                        const float *gyr = t1 + (size_t)oy * sd->ow;
                        float *gxr = t2 + (size_t)iy * sd->w;
                        for (int32_t ox = 0; ox < sd->ow; ox++) {
                            const int32_t ix = ox * sd->sw - sd->pw + kx * sd->dw;
                            if (ix >= 0 && ix < sd->w) gxr[ix] += gyr[ox] * wv;
                        }
                    }
                }
            const size_t b2 = ((size_t)i * ch + c) * hw;
            for (size_t q = 0; q < hw; q++) {
                const size_t b = b2 + q;
                t2[q] = (bits2[b >> 3] >> (b & 7)) & 1u ? t2[q] : 0.0f;
                acce += t2[q];
            }
            if (c < k3) memcpy(g3 + ((size_t)i * k3 + c) * hw, t2, sizeof(float) * hw);
            if (gx)
                for (int32_t ic = 0; ic < cin; ic++) {
                    const int8_t *wrow = c < re ? we + (size_t)c * cin : we2 + (size_t)(c - re) * cin;
                    const float wv = (float)wrow[ic] * wse[c];
                    float *g = gx + ((size_t)i * cin + ic) * hw;
                    for (size_t q = 0; q < hw; q++) g[q] += t2[q] * wv;
                }
        }
        if (gbd) gbd[c] = accd;
        if (gbe) gbe[c] = acce;
    }
}

void gr_bcast_masked_f32(const float *d, int32_t dn, int32_t dc, const uint8_t *bits, int32_t n, int32_t c,
                         int32_t hw, int32_t c0, int32_t c1, float *out) {
    for (int32_t i = 0; i < n; i++)
        for (int32_t ch = c0; ch < c1; ch++) {
            const float v = d[(size_t)i * dn + (size_t)ch * dc];
            const size_t base = ((size_t)i * c + ch) * hw;
            float *o = out + ((size_t)i * (c1 - c0) + (ch - c0)) * hw;
            for (int32_t p = 0; p < hw; p++) {
                const size_t b = base + p;
                o[p] = (bits[b >> 3] >> (b & 7)) & 1u ? v : 0.0f;
            }
        }
}

void gr_linear_bwd_input_ws8_f32(const float *gy, const int8_t *w, const float *ws, int32_t o0, int32_t o1,
                                 int32_t accumulate, float *gx, int32_t rows, int32_t kin, int32_t nout) {
    for (int32_t r = 0; r < rows; r++)
        for (int32_t i = 0; i < kin; i++) {
            float acc = accumulate ? gx[(size_t)r * kin + i] : 0.0f;
            for (int32_t o = o0; o < o1; o++)
                acc += gy[(size_t)r * nout + o] * ((float)w[(size_t)(o - o0) * kin + i] * ws[o]);
            gx[(size_t)r * kin + i] = acc;
        }
}

void gr_linear_bwd_weight_xs8_f32(const float *gy, const int8_t *x, float xs, int32_t xz, float *gw,
                                  int32_t rows, int32_t kin, int32_t nout, int32_t k) {
    for (int32_t o = 0; o < k; o++)
        for (int32_t i = 0; i < kin; i++) {
            float acc = 0.0f;
            for (int32_t r = 0; r < rows; r++)
                acc += gy[(size_t)r * nout + o] * GR_DQ(x[(size_t)r * kin + i], xz, xs);
            gw[(size_t)o * kin + i] = acc;
        }
}

void gr_reduce_s8_f32(const int8_t *x, float s, int32_t zp, float *y, int32_t outer, int32_t red, int32_t inner,
                      int32_t mean) {
    /* gr_reduce_f32 over dq(x): the same terms (one float per element, as
       gr_dequantize_i8_f32 makes them) added in the same order */
    for (int32_t o = 0; o < outer; o++)
        for (int32_t i = 0; i < inner; i++) {
            float acc = 0.0f;
            for (int32_t r = 0; r < red; r++) acc += GR_DQ(x[((size_t)o * red + r) * inner + i], zp, s);
            y[(size_t)o * inner + i] = mean ? acc / (float)red : acc;
        }
}

void gr_ste_s8_f32(const float *gy, const int8_t *q, int32_t qmin, int32_t qmax, float *gx, int32_t n) {
    for (int32_t i = 0; i < n; i++) gx[i] = (q[i] > qmin && q[i] < qmax) ? gy[i] : 0.0f;
}

void gr_threshold_bwd_s8_f32(const float *gy, const int8_t *q, float s, int32_t zp, float t, float *gx, int32_t n) {
    for (int32_t i = 0; i < n; i++) gx[i] = GR_DQ(q[i], zp, s) <= t ? 0.0f : gy[i];
}

void gr_hardtanh_bwd_s8_f32(const float *gy, const int8_t *q, float s, int32_t zp, float lo, float hi,
                            float *gx, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        const float v = GR_DQ(q[i], zp, s);
        gx[i] = (v <= lo || v >= hi) ? 0.0f : gy[i];
    }
}

void gr_mask_bits_s8(const int8_t *q, int32_t n, int32_t qmin, int32_t qmax, float s, int32_t zp, float lo,
                     float hi, uint8_t *bits) {
    memset(bits, 0, (size_t)(n + 7) / 8);
    for (int32_t i = 0; i < n; i++) {
        const float v = GR_DQ(q[i], zp, s);
        if (q[i] > qmin && q[i] < qmax && v > lo && v < hi) bits[i >> 3] |= (uint8_t)(1u << (i & 7));
    }
}

void gr_masked_grad_f32(const float *g, const uint8_t *bits, int32_t n, float *gx) {
    for (int32_t i = 0; i < n; i++) gx[i] = (bits[i >> 3] >> (i & 7)) & 1u ? g[i] : 0.0f;
}

/* 24 random bits as a float in [0, 1) */
static float gr_round_offset(uint32_t *rng) {
    uint32_t x = *rng;
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    *rng = x;
    return (float)(x >> 8) * 0x1p-24f;
}

/* -delta rounded (nearest, ties to even as torch.round; or floor(-delta + u) with u
   uniform in [0, 1): stochastic) as an integer, saturated well outside int8/int32 */
static int64_t gr_round_step(float delta, uint32_t *rng) {
    const float v = rng ? floorf(-delta + gr_round_offset(rng)) : nearbyintf(-delta);
    if (v != v) return 0;
    if (v > 4294967296.0f) return INT64_C(4294967296);
    if (v < -4294967296.0f) return -INT64_C(4294967296);
    return (int64_t)v;
}

void gr_sgd_s8(int8_t *w, const float *g, const float *f, float lr, int32_t rows, int32_t cols,
               int32_t lo, int32_t hi, uint32_t *rng) {
    for (int32_t r = 0; r < rows; r++)
        for (int32_t j = 0; j < cols; j++) {
            const size_t i = (size_t)r * cols + j;
            const int64_t v = (int64_t)w[i] + gr_round_step(lr * (g[i] * f[r]), rng);
            w[i] = (int8_t)(v < lo ? lo : (v > hi ? hi : v));
        }
}

void gr_sgd_s32(int32_t *w, const float *g, const float *f, float lr, int32_t rows, int32_t cols,
                int32_t bound, uint32_t *rng) {
    for (int32_t r = 0; r < rows; r++)
        for (int32_t j = 0; j < cols; j++) {
            const size_t i = (size_t)r * cols + j;
            const int64_t v = (int64_t)w[i] + gr_round_step(lr * (g[i] * f[r]), rng);
            w[i] = (int32_t)(v < -bound ? -bound : (v > bound ? bound : v));
        }
}
