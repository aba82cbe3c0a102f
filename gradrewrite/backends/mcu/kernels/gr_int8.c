/* int8 kernels with TFLite / CMSIS-NN integer semantics: symmetric per-channel
 * int8 weights (zero point 0), asymmetric int8 activations, int32 accumulators and
 * bias (bias_q = round(b / (s_x * s_w[c]))), and a fixed-point requantization
 * multiplier + shift per output channel. */
#include <math.h>
#include "gr_kernels.h"

void gr_quantize_f32_i8(const float *x, int8_t *y, int32_t n, float inv_scale, int32_t zp) {
    int32_t i;
    for (i = 0; i < n; i++) {
        float r = nearbyintf(x[i] * inv_scale) + (float)zp;  /* round half to even, like torch.round */
        y[i] = (int8_t)(r < -128.0f ? -128 : (r > 127.0f ? 127 : (int32_t)r));
    }
}

void gr_dequantize_i8_f32(const int8_t *x, float *y, int32_t n, float scale, int32_t zp) {
    int32_t i;
    for (i = 0; i < n; i++) y[i] = ((float)x[i] - (float)zp) * scale;
}

int32_t gr_requantize(int32_t acc, int32_t mult, int32_t shift) {
    int32_t total = 31 - shift;   /* the planner keeps 1 <= total <= 62 */
    int64_t prod = (int64_t)acc * mult + ((int64_t)1 << (total - 1));
    return (int32_t)(prod >> total);  /* arithmetic shift: floor, so ties round up */
}

static int8_t saturate(int32_t v, const gr_quant_params *q) {
    v += q->out_zp;
    v = v < q->act_min ? q->act_min : (v > q->act_max ? q->act_max : v);
    return (int8_t)v;
}

/* 1x1, no padding, one group: a dot product over channels per output pixel */
static void pointwise_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x,
                         const int8_t *w, const int32_t *bias, int8_t *y) {
    int32_t hw = s->h * s->w, n, o, c, zp = q->in_zp;
    for (n = 0; n < s->n; n++) {
        const int8_t *xn = x + (size_t)n * s->c * hw;
        for (o = 0; o < s->oc; o++) {
            const int8_t *wo = w + (size_t)o * s->c;
            int8_t *yo = y + ((size_t)n * s->oc + o) * s->oh * s->ow;
            int32_t wsum = 0;
            /* sum_c w*(x - zp) = sum_c w*x - zp * sum_c w: the zero point leaves the loop */
            for (c = 0; c < s->c; c++) wsum += wo[c];
            int32_t base = (bias ? bias[o] : 0) - zp * wsum, p = 0;
            if (s->sh == 1 && s->sw == 1) {
                /* stride 1: output pixel p reads input pixel p; four pixels share each weight load */
                for (; p + 3 < hw; p += 4) {
                    int32_t a0 = base, a1 = base, a2 = base, a3 = base;
                    const int8_t *xp = xn + p;
                    for (c = 0; c < s->c; c++, xp += hw) {
                        int32_t wv = wo[c];
                        a0 += wv * xp[0]; a1 += wv * xp[1]; a2 += wv * xp[2]; a3 += wv * xp[3];
                    }
                    yo[p] = saturate(gr_requantize(a0, q->mult[o], q->shift[o]), q);
                    yo[p + 1] = saturate(gr_requantize(a1, q->mult[o], q->shift[o]), q);
                    yo[p + 2] = saturate(gr_requantize(a2, q->mult[o], q->shift[o]), q);
                    yo[p + 3] = saturate(gr_requantize(a3, q->mult[o], q->shift[o]), q);
                }
            }
            for (; p < s->oh * s->ow; p++) {
                int32_t oy = p / s->ow, ox = p % s->ow;
                const int8_t *xp = xn + (size_t)oy * s->sh * s->w + (size_t)ox * s->sw;
                int32_t acc = base;
                for (c = 0; c < s->c; c++) acc += (int32_t)wo[c] * (int32_t)xp[(size_t)c * hw];
                yo[p] = saturate(gr_requantize(acc, q->mult[o], q->shift[o]), q);
            }
        }
    }
}

/* depthwise 3x3, dilation 1: interior outputs use sum w*x - zp * sum w (nine weights
 * in registers), border outputs skip the padded taps (real value 0) */
static void depthwise3x3_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x,
                            const int8_t *w, const int32_t *bias, int8_t *y) {
    int32_t n, c, oy, ox, ky, kx, zp = q->in_zp;
    for (n = 0; n < s->n; n++) for (c = 0; c < s->c; c++) {
        const int8_t *xc = x + ((size_t)n * s->c + c) * s->h * s->w;
        const int8_t *wc = w + (size_t)c * 9;
        int8_t *yc = y + ((size_t)n * s->oc + c) * s->oh * s->ow;
        const int32_t w0 = wc[0], w1 = wc[1], w2 = wc[2], w3 = wc[3], w4 = wc[4], w5 = wc[5];
        const int32_t w6 = wc[6], w7 = wc[7], w8 = wc[8], b0 = bias ? bias[c] : 0;
        const int32_t full = b0 - zp * (w0 + w1 + w2 + w3 + w4 + w5 + w6 + w7 + w8);
        const int32_t mult = q->mult[c], shift = q->shift[c];
        for (oy = 0; oy < s->oh; oy++) {
            int32_t iy0 = oy * s->sh - s->ph, rows_in = iy0 >= 0 && iy0 + 2 < s->h;
            for (ox = 0; ox < s->ow; ox++) {
                int32_t ix0 = ox * s->sw - s->pw, acc;
                if (rows_in && ix0 >= 0 && ix0 + 2 < s->w) {
                    const int8_t *r0 = xc + (size_t)iy0 * s->w + ix0, *r1 = r0 + s->w, *r2 = r1 + s->w;
                    acc = full + w0 * r0[0] + w1 * r0[1] + w2 * r0[2] + w3 * r1[0] + w4 * r1[1] + w5 * r1[2]
                        + w6 * r2[0] + w7 * r2[1] + w8 * r2[2];
                } else {
                    acc = b0;
                    for (ky = 0; ky < 3; ky++) {
                        int32_t iy = iy0 + ky;
                        if (iy < 0 || iy >= s->h) continue;
                        for (kx = 0; kx < 3; kx++) {
                            int32_t ix = ix0 + kx;
                            if (ix >= 0 && ix < s->w)
                                acc += (int32_t)wc[ky * 3 + kx] * ((int32_t)xc[(size_t)iy * s->w + ix] - zp);
                        }
                    }
                }
                yc[oy * s->ow + ox] = saturate(gr_requantize(acc, mult, shift), q);
            }
        }
    }
}

void gr_conv2d_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x,
                  const int8_t *w, const int32_t *bias, int8_t *y) {
    int32_t cin_g = s->c / s->groups, cout_g = s->oc / s->groups;
    int32_t n, o, oy, ox, c, ky, kx, zp = q->in_zp;
    if (s->groups == s->c && s->oc == s->c && s->kh == 3 && s->kw == 3 && s->dh == 1 && s->dw == 1) {
        depthwise3x3_s8(s, q, x, w, bias, y);
        return;
    }
    if (s->kh == 1 && s->kw == 1 && s->ph == 0 && s->pw == 0 && s->groups == 1 && s->dh == 1 && s->dw == 1) {
        pointwise_s8(s, q, x, w, bias, y);
        return;
    }
    for (n = 0; n < s->n; n++) {
        for (o = 0; o < s->oc; o++) {
            int32_t g = o / cout_g;
            const int8_t *wo = w + (size_t)o * cin_g * s->kh * s->kw;
            int8_t *yo = y + ((size_t)n * s->oc + o) * s->oh * s->ow;
            for (oy = 0; oy < s->oh; oy++) {
                int32_t iy0 = oy * s->sh - s->ph, ky0 = 0, ky1 = s->kh;
                while (ky0 < ky1 && iy0 + ky0 * s->dh < 0) ky0++;
                while (ky1 > ky0 && iy0 + (ky1 - 1) * s->dh >= s->h) ky1--;
                for (ox = 0; ox < s->ow; ox++) {
                    int32_t ix0 = ox * s->sw - s->pw, kx0 = 0, kx1 = s->kw;
                    int32_t acc = bias ? bias[o] : 0;
                    while (kx0 < kx1 && ix0 + kx0 * s->dw < 0) kx0++;
                    while (kx1 > kx0 && ix0 + (kx1 - 1) * s->dw >= s->w) kx1--;
                    /* padded pixels hold the real value 0 and contribute nothing */
                    if (s->kw == 3 && s->dw == 1 && s->sw == 1 && ox + 3 < s->ow && ix0 >= 0 && ix0 + 5 < s->w) {
                        /* four neighbouring outputs with full 3-wide windows share their loads */
                        int32_t a0 = acc, a1 = acc, a2 = acc, a3 = acc;
                        for (c = 0; c < cin_g; c++) {
                            const int8_t *xc = x + (((size_t)n * s->c + (size_t)g * cin_g + c) * s->h) * s->w + ix0;
                            const int8_t *wc = wo + (size_t)c * s->kh * 3;
                            for (ky = ky0; ky < ky1; ky++) {
                                const int8_t *xr = xc + (size_t)(iy0 + ky * s->dh) * s->w;
                                const int32_t w0 = wc[ky * 3], w1 = wc[ky * 3 + 1], w2 = wc[ky * 3 + 2];
                                const int32_t x0 = xr[0] - zp, x1 = xr[1] - zp, x2 = xr[2] - zp;
                                const int32_t x3 = xr[3] - zp, x4 = xr[4] - zp, x5 = xr[5] - zp;
                                a0 += w0 * x0 + w1 * x1 + w2 * x2;
                                a1 += w0 * x1 + w1 * x2 + w2 * x3;
                                a2 += w0 * x2 + w1 * x3 + w2 * x4;
                                a3 += w0 * x3 + w1 * x4 + w2 * x5;
                            }
                        }
                        yo[oy * s->ow + ox] = saturate(gr_requantize(a0, q->mult[o], q->shift[o]), q);
                        yo[oy * s->ow + ox + 1] = saturate(gr_requantize(a1, q->mult[o], q->shift[o]), q);
                        yo[oy * s->ow + ox + 2] = saturate(gr_requantize(a2, q->mult[o], q->shift[o]), q);
                        yo[oy * s->ow + ox + 3] = saturate(gr_requantize(a3, q->mult[o], q->shift[o]), q);
                        ox += 3;
                        continue;
                    }
                    if (kx0 == 0 && kx1 == 3 && s->kw == 3 && s->dw == 1) {
                        for (c = 0; c < cin_g; c++) {
                            const int8_t *xc = x + (((size_t)n * s->c + (size_t)g * cin_g + c) * s->h) * s->w + ix0;
                            const int8_t *wc = wo + (size_t)c * s->kh * 3;
                            for (ky = ky0; ky < ky1; ky++) {
                                const int8_t *xr = xc + (size_t)(iy0 + ky * s->dh) * s->w;
                                const int8_t *wr = wc + ky * 3;
                                acc += (int32_t)wr[0] * ((int32_t)xr[0] - zp) + (int32_t)wr[1] * ((int32_t)xr[1] - zp)
                                     + (int32_t)wr[2] * ((int32_t)xr[2] - zp);
                            }
                        }
                        yo[oy * s->ow + ox] = saturate(gr_requantize(acc, q->mult[o], q->shift[o]), q);
                        continue;
                    }
                    for (c = 0; c < cin_g; c++) {
                        const int8_t *xc = x + (((size_t)n * s->c + (size_t)g * cin_g + c) * s->h) * s->w;
                        const int8_t *wc = wo + (size_t)c * s->kh * s->kw;
                        for (ky = ky0; ky < ky1; ky++) {
                            const int8_t *xr = xc + (size_t)(iy0 + ky * s->dh) * s->w + ix0;
                            const int8_t *wr = wc + ky * s->kw;
                            for (kx = kx0; kx < kx1; kx++) acc += (int32_t)wr[kx] * ((int32_t)xr[kx * s->dw] - zp);
                        }
                    }
                    yo[oy * s->ow + ox] = saturate(gr_requantize(acc, q->mult[o], q->shift[o]), q);
                }
            }
        }
    }
}

void gr_linear_s8(const gr_quant_params *q, const int8_t *x, const int8_t *w,
                  const int32_t *bias, int8_t *y, int32_t m, int32_t k, int32_t n) {
    int32_t i, j, t, zp = q->in_zp;
    for (i = 0; i < m; i++) {
        const int8_t *xi = x + (size_t)i * k;
        for (j = 0; j < n; j++) {
            const int8_t *wj = w + (size_t)j * k;
            int32_t acc = bias ? bias[j] : 0;
            for (t = 0; t < k; t++) acc += (int32_t)wj[t] * ((int32_t)xi[t] - zp);
            y[(size_t)i * n + j] = saturate(gr_requantize(acc, q->mult[j], q->shift[j]), q);
        }
    }
}

void gr_add_s8(const int8_t *a, int32_t a_zp, const int8_t *b, int32_t b_zp, int8_t *y, int32_t n,
               const int32_t *mult, const int32_t *shift, int32_t out_zp, int32_t act_min, int32_t act_max) {
    int32_t i;
    for (i = 0; i < n; i++) {
        int32_t av = gr_requantize(((int32_t)a[i] - a_zp) * (1 << 20), mult[1], shift[1]);
        int32_t bv = gr_requantize(((int32_t)b[i] - b_zp) * (1 << 20), mult[2], shift[2]);
        int32_t r = gr_requantize(av + bv, mult[0], shift[0]) + out_zp;
        y[i] = (int8_t)(r < act_min ? act_min : (r > act_max ? act_max : r));
    }
}

void gr_max_pool2d_s8(const gr_pool_shape *s, const int8_t *x, int8_t *y) {
    int32_t c, oy, ox, ky, kx;
    for (c = 0; c < s->nc; c++) {
        const int8_t *xc = x + (size_t)c * s->h * s->w;
        for (oy = 0; oy < s->oh; oy++) for (ox = 0; ox < s->ow; ox++) {
            int32_t mx = -128;
            for (ky = 0; ky < s->kh; ky++) {
                int32_t iy = oy * s->sh - s->ph + ky * s->dh;
                if (iy < 0 || iy >= s->h) continue;
                for (kx = 0; kx < s->kw; kx++) {
                    int32_t ix = ox * s->sw - s->pw + kx * s->dw;
                    if (ix >= 0 && ix < s->w && xc[iy * s->w + ix] > mx) mx = xc[iy * s->w + ix];
                }
            }
            y[((size_t)c * s->oh + oy) * s->ow + ox] = (int8_t)mx;
        }
    }
}
