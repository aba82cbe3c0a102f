/* 2-D convolution, fp32, NCHW. Pointwise (1x1, stride 1, no padding) runs as a
 * GEMM over pixels; depthwise and general convs loop over the window with the
 * padding bounds hoisted out of the inner loop. */
#include "gr_kernels.h"

static float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

static void pointwise(const gr_conv_shape *s, const float *x, const float *w, const float *b,
                      float *y, float lo, float hi) {
    int32_t hw = s->h * s->w, n, o, c, p;
    for (n = 0; n < s->n; n++) {
        const float *xn = x + (size_t)n * s->c * hw;
        float *yn = y + (size_t)n * s->oc * hw;
        for (o = 0; o < s->oc; o++) {
            float *yo = yn + (size_t)o * hw;
            const float *wo = w + (size_t)o * s->c;
            float bias = b ? b[o] : 0.0f;
            /* four pixels in registers share each weight load; channels stream by */
            for (p = 0; p + 3 < hw; p += 4) {
                float a0 = bias, a1 = bias, a2 = bias, a3 = bias;
                const float *xp = xn + p;
                for (c = 0; c < s->c; c++, xp += hw) {
                    float wv = wo[c];
                    a0 = GR_FMA(wv, xp[0], a0); a1 = GR_FMA(wv, xp[1], a1); a2 = GR_FMA(wv, xp[2], a2); a3 = GR_FMA(wv, xp[3], a3);
                }
                yo[p] = clampf(a0, lo, hi); yo[p + 1] = clampf(a1, lo, hi);
                yo[p + 2] = clampf(a2, lo, hi); yo[p + 3] = clampf(a3, lo, hi);
            }
            for (; p < hw; p++) {
                float acc = bias;
                for (c = 0; c < s->c; c++) acc = GR_FMA(wo[c], xn[(size_t)c * hw + p], acc);
                yo[p] = clampf(acc, lo, hi);
            }
        }
    }
}

/* depthwise 3x3 (dilation 1, any stride/padding): a channel's nine weights stay in
 * registers; interior outputs run unrolled, border ones check each tap */
static void depthwise3x3(const gr_conv_shape *s, const float *x, const float *w, const float *b,
                         float *y, float lo, float hi) {
    int32_t n, c, oy, ox, ky, kx;
    for (n = 0; n < s->n; n++) for (c = 0; c < s->c; c++) {
        const float *xc = x + ((size_t)n * s->c + c) * s->h * s->w;
        const float *wc = w + (size_t)c * 9;
        float *yc = y + ((size_t)n * s->oc + c) * s->oh * s->ow;
        const float w0 = wc[0], w1 = wc[1], w2 = wc[2], w3 = wc[3], w4 = wc[4], w5 = wc[5];
        const float w6 = wc[6], w7 = wc[7], w8 = wc[8], bias = b ? b[c] : 0.0f;
        for (oy = 0; oy < s->oh; oy++) {
            int32_t iy0 = oy * s->sh - s->ph, rows_in = iy0 >= 0 && iy0 + 2 < s->h;
            for (ox = 0; ox < s->ow; ox++) {
                int32_t ix0 = ox * s->sw - s->pw;
                float acc = bias;
                if (rows_in && ix0 >= 0 && ix0 + 2 < s->w) {
                    const float *r0 = xc + (size_t)iy0 * s->w + ix0, *r1 = r0 + s->w, *r2 = r1 + s->w;
                    acc = GR_FMA(w0, r0[0], acc); acc = GR_FMA(w1, r0[1], acc); acc = GR_FMA(w2, r0[2], acc);
                    acc = GR_FMA(w3, r1[0], acc); acc = GR_FMA(w4, r1[1], acc); acc = GR_FMA(w5, r1[2], acc);
                    acc = GR_FMA(w6, r2[0], acc); acc = GR_FMA(w7, r2[1], acc); acc = GR_FMA(w8, r2[2], acc);
                } else {
                    for (ky = 0; ky < 3; ky++) {
                        int32_t iy = iy0 + ky;
                        if (iy < 0 || iy >= s->h) continue;
                        for (kx = 0; kx < 3; kx++) {
                            int32_t ix = ix0 + kx;
                            if (ix >= 0 && ix < s->w) acc += wc[ky * 3 + kx] * xc[(size_t)iy * s->w + ix];
                        }
                    }
                }
                yc[oy * s->ow + ox] = clampf(acc, lo, hi);
            }
        }
    }
}

void gr_conv2d_f32(const gr_conv_shape *s, const float *x, const float *w, const float *b,
                   float *y, float lo, float hi) {
    int32_t cin_g = s->c / s->groups, cout_g = s->oc / s->groups;
    int32_t n, o, oy, ox, c, ky, kx;
    if (s->groups == s->c && s->oc == s->c && s->kh == 3 && s->kw == 3 && s->dh == 1 && s->dw == 1) {
        depthwise3x3(s, x, w, b, y, lo, hi);
        return;
    }
    if (s->kh == 1 && s->kw == 1 && s->sh == 1 && s->sw == 1 && s->ph == 0 && s->pw == 0 &&
        s->groups == 1 && s->oh == s->h && s->ow == s->w) {
        pointwise(s, x, w, b, y, lo, hi);
        return;
    }
    for (n = 0; n < s->n; n++) {
        for (o = 0; o < s->oc; o++) {
            int32_t g = o / cout_g;
            const float *wo = w + (size_t)o * cin_g * s->kh * s->kw;
            float bias = b ? b[o] : 0.0f;
            float *yo = y + ((size_t)n * s->oc + o) * s->oh * s->ow;
            for (oy = 0; oy < s->oh; oy++) {
                int32_t iy0 = oy * s->sh - s->ph;
                int32_t ky0 = 0, ky1 = s->kh;
                while (ky0 < ky1 && iy0 + ky0 * s->dh < 0) ky0++;
                while (ky1 > ky0 && iy0 + (ky1 - 1) * s->dh >= s->h) ky1--;
                for (ox = 0; ox < s->ow; ox++) {
                    int32_t ix0 = ox * s->sw - s->pw;
                    int32_t kx0 = 0, kx1 = s->kw;
                    float acc = bias;
                    while (kx0 < kx1 && ix0 + kx0 * s->dw < 0) kx0++;
                    while (kx1 > kx0 && ix0 + (kx1 - 1) * s->dw >= s->w) kx1--;
                    if (s->kw == 3 && s->dw == 1 && s->sw == 1 && ox + 3 < s->ow && ix0 >= 0 && ix0 + 5 < s->w) {
                        /* four neighbouring outputs with full 3-wide windows: 12 MACs per 9 loads */
                        float a0 = bias, a1 = bias, a2 = bias, a3 = bias;
                        for (c = 0; c < cin_g; c++) {
                            const float *xc = x + (((size_t)n * s->c + (size_t)g * cin_g + c) * s->h) * s->w + ix0;
                            const float *wc = wo + (size_t)c * s->kh * 3;
                            for (ky = ky0; ky < ky1; ky++) {
                                const float *xr = xc + (size_t)(iy0 + ky * s->dh) * s->w;
                                const float w0 = wc[ky * 3], w1 = wc[ky * 3 + 1], w2 = wc[ky * 3 + 2];
                                const float x0 = xr[0], x1 = xr[1], x2 = xr[2], x3 = xr[3], x4 = xr[4], x5 = xr[5];
                                a0 = GR_FMA(w0, x0, a0); a0 = GR_FMA(w1, x1, a0); a0 = GR_FMA(w2, x2, a0);
                                a1 = GR_FMA(w0, x1, a1); a1 = GR_FMA(w1, x2, a1); a1 = GR_FMA(w2, x3, a1);
                                a2 = GR_FMA(w0, x2, a2); a2 = GR_FMA(w1, x3, a2); a2 = GR_FMA(w2, x4, a2);
                                a3 = GR_FMA(w0, x3, a3); a3 = GR_FMA(w1, x4, a3); a3 = GR_FMA(w2, x5, a3);
                            }
                        }
                        yo[oy * s->ow + ox] = clampf(a0, lo, hi);
                        yo[oy * s->ow + ox + 1] = clampf(a1, lo, hi);
                        yo[oy * s->ow + ox + 2] = clampf(a2, lo, hi);
                        yo[oy * s->ow + ox + 3] = clampf(a3, lo, hi);
                        ox += 3;
                        continue;
                    }
                    if (kx0 == 0 && kx1 == 3 && s->kw == 3 && s->dw == 1) {
                        /* full 3-wide window (the common case): unrolled, no inner loop */
                        for (c = 0; c < cin_g; c++) {
                            const float *xc = x + (((size_t)n * s->c + (size_t)g * cin_g + c) * s->h) * s->w + ix0;
                            const float *wc = wo + (size_t)c * s->kh * 3;
                            for (ky = ky0; ky < ky1; ky++) {
                                const float *xr = xc + (size_t)(iy0 + ky * s->dh) * s->w;
                                const float *wr = wc + ky * 3;
                                acc = GR_FMA(wr[0], xr[0], acc); acc = GR_FMA(wr[1], xr[1], acc); acc = GR_FMA(wr[2], xr[2], acc);
                            }
                        }
                        yo[oy * s->ow + ox] = clampf(acc, lo, hi);
                        continue;
                    }
                    for (c = 0; c < cin_g; c++) {
                        const float *xc = x + (((size_t)n * s->c + (size_t)g * cin_g + c) * s->h) * s->w;
                        const float *wc = wo + (size_t)c * s->kh * s->kw;
                        for (ky = ky0; ky < ky1; ky++) {
                            const float *xr = xc + (size_t)(iy0 + ky * s->dh) * s->w + ix0;
                            const float *wr = wc + ky * s->kw;
                            for (kx = kx0; kx < kx1; kx++) acc = GR_FMA(wr[kx], xr[kx * s->dw], acc);
                        }
                    }
                    yo[oy * s->ow + ox] = clampf(acc, lo, hi);
                }
            }
        }
    }
}
