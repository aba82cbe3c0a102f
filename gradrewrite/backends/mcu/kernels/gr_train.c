/* fp32 backward kernels and the in-place SGD update (see gr_train.h). Loops follow
   the forward kernels' index math in gr_conv.c / gr_pool.c, transposed. */
#include <math.h>
#include <string.h>
#include "gr_train.h"

void gr_conv2d_bwd_input_f32(const gr_conv_shape *s, const float *gy, const float *w, float *gx) {
    memset(gx, 0, sizeof(float) * (size_t)s->n * s->c * s->h * s->w);
    gr_conv2d_bwd_input_acc_f32(s, gy, w, gx);
}

void gr_conv2d_bwd_input_acc_f32(const gr_conv_shape *s, const float *gy, const float *w, float *gx) {
    const int32_t cpg = s->c / s->groups, opg = s->oc / s->groups;
    for (int32_t n = 0; n < s->n; n++)
        for (int32_t oc = 0; oc < s->oc; oc++) {
            const int32_t g = oc / opg;
            const float *gyp = gy + ((size_t)n * s->oc + oc) * s->oh * s->ow;
            for (int32_t ic = 0; ic < cpg; ic++) {
                const float *wp = w + ((size_t)oc * cpg + ic) * s->kh * s->kw;
                float *gxp = gx + ((size_t)n * s->c + g * cpg + ic) * s->h * s->w;
                for (int32_t oy = 0; oy < s->oh; oy++)
                    for (int32_t ox = 0; ox < s->ow; ox++) {
                        const float d = gyp[oy * s->ow + ox];
                        if (d == 0.0f) continue;
                        for (int32_t ky = 0; ky < s->kh; ky++) {
                            const int32_t iy = oy * s->sh - s->ph + ky * s->dh;
                            if (iy < 0 || iy >= s->h) continue;
                            for (int32_t kx = 0; kx < s->kw; kx++) {
                                const int32_t ix = ox * s->sw - s->pw + kx * s->dw;
                                if (ix < 0 || ix >= s->w) continue;
                                gxp[iy * s->w + ix] += d * wp[ky * s->kw + kx];
                            }
                        }
                    }
            }
        }
}

/* The weight-gradient loop: per weight, images, then oy, ox in order (the int8 reference
   mirrors this order); LOAD(i) reads the input element at flat index i of its plane. */
#define GR_CONV_BWD_WEIGHT(LOAD)                                                              \
    const int32_t cpg = s->c / s->groups, opg = s->oc / s->groups;                            \
    for (int32_t oc = 0; oc < k; oc++) {                                                      \
        const int32_t g = oc / opg;                                                           \
        for (int32_t ic = 0; ic < cpg; ic++)                                                  \
            for (int32_t ky = 0; ky < s->kh; ky++)                                            \
                for (int32_t kx = 0; kx < s->kw; kx++) {                                      \
                    float acc = 0.0f;                                                         \
                    for (int32_t n = 0; n < s->n; n++) {                                      \
                        const float *gyp = gy + ((size_t)n * k + oc) * s->oh * s->ow;         \
                        const size_t plane = ((size_t)n * s->c + g * cpg + ic) * s->h * s->w; \
                        for (int32_t oy = 0; oy < s->oh; oy++) {                              \
                            const int32_t iy = oy * s->sh - s->ph + ky * s->dh;               \
                            if (iy < 0 || iy >= s->h) continue;                               \
                            for (int32_t ox = 0; ox < s->ow; ox++) {                          \
                                const int32_t ix = ox * s->sw - s->pw + kx * s->dw;           \
                                if (ix < 0 || ix >= s->w) continue;                           \
                                acc += gyp[oy * s->ow + ox] * LOAD(plane + (size_t)iy * s->w + ix); \
                            }                                                                 \
                        }                                                                     \
                    }                                                                         \
                    gw[(((size_t)oc * cpg + ic) * s->kh + ky) * s->kw + kx] = acc;            \
                }                                                                             \
    }

void gr_conv2d_bwd_weight_f32(const gr_conv_shape *s, int32_t k, const float *gy, const float *x, float *gw) {
#define GR_LOAD_F32(i) x[i]
    GR_CONV_BWD_WEIGHT(GR_LOAD_F32)
#undef GR_LOAD_F32
}

void gr_conv2d_bwd_weight_xs8_f32(const gr_conv_shape *s, int32_t k, const float *gy, const int8_t *x,
                                  float xs, int32_t xz, float *gw) {
#define GR_LOAD_S8(i) (((float)x[i] - (float)xz) * xs)
    GR_CONV_BWD_WEIGHT(GR_LOAD_S8)
#undef GR_LOAD_S8
}

void gr_conv2d_bwd_bias_f32(int32_t n, int32_t k, int32_t hw, const float *gy, float *gb) {
    for (int32_t c = 0; c < k; c++) {
        float acc = 0.0f;
        for (int32_t i = 0; i < n; i++) {
            const float *p = gy + ((size_t)i * k + c) * hw;
            for (int32_t j = 0; j < hw; j++) acc += p[j];
        }
        gb[c] = acc;
    }
}

void gr_linear_bwd_input_f32(const float *gy, const float *w, float *gx, int32_t rows, int32_t kin, int32_t nout) {
    for (int32_t r = 0; r < rows; r++)
        for (int32_t i = 0; i < kin; i++) {
            float acc = 0.0f;
            for (int32_t o = 0; o < nout; o++) acc += gy[(size_t)r * nout + o] * w[(size_t)o * kin + i];
            gx[(size_t)r * kin + i] = acc;
        }
}

void gr_linear_bwd_weight_f32(const float *gy, const float *x, float *gw, int32_t rows, int32_t kin, int32_t nout) {
    for (int32_t o = 0; o < nout; o++)
        for (int32_t i = 0; i < kin; i++) {
            float acc = 0.0f;
            for (int32_t r = 0; r < rows; r++) acc += gy[(size_t)r * nout + o] * x[(size_t)r * kin + i];
            gw[(size_t)o * kin + i] = acc;
        }
}

void gr_linear_bwd_bias_f32(const float *gy, float *gb, int32_t rows, int32_t nout) {
    for (int32_t o = 0; o < nout; o++) {
        float acc = 0.0f;
        for (int32_t r = 0; r < rows; r++) acc += gy[(size_t)r * nout + o];
        gb[o] = acc;
    }
}

void gr_threshold_bwd_f32(const float *gy, const float *y, float threshold, float *gx, int32_t n) {
    for (int32_t i = 0; i < n; i++) gx[i] = y[i] <= threshold ? 0.0f : gy[i];
}

void gr_hardtanh_bwd_f32(const float *gy, const float *x, float lo, float hi, float *gx, int32_t n) {
    for (int32_t i = 0; i < n; i++) gx[i] = (x[i] <= lo || x[i] >= hi) ? 0.0f : gy[i];
}

void gr_sigmoid_bwd_f32(const float *gy, const float *y, float *gx, int32_t n) {
    for (int32_t i = 0; i < n; i++) gx[i] = gy[i] * (1.0f - y[i]) * y[i];   /* torch's order */
}

void gr_where_cmp_f32(int32_t op, const float *x, float s, const float *a, float ca, const float *b, float cb,
                      float *y, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        const float v = x[i];
        const int c = op == GR_LE ? v <= s : op == GR_GE ? v >= s : op == GR_LT ? v < s : v > s;
        y[i] = c ? (a ? a[i] : ca) : (b ? b[i] : cb);
    }
}

void gr_sigmoid_tr_f32(const float *x, float *y, int32_t n) {
    for (int32_t i = 0; i < n; i++) y[i] = 1.0f / (1.0f + gr_expf(-x[i]));
}

void gr_hardsigmoid_bwd_f32(const float *gy, const float *x, float *gx, int32_t n) {
    for (int32_t i = 0; i < n; i++) gx[i] = (x[i] > -3.0f && x[i] < 3.0f) ? gy[i] * (1.0f / 6.0f) : 0.0f;
}

void gr_max_pool2d_idx_f32(const gr_pool_shape *s, const float *x, float *y, int64_t *idx) {
    for (int32_t c = 0; c < s->nc; c++) {
        const float *xc = x + (size_t)c * s->h * s->w;
        for (int32_t oy = 0; oy < s->oh; oy++)
            for (int32_t ox = 0; ox < s->ow; ox++) {
                float mx = -INFINITY;
                int64_t at = -1;
                for (int32_t ky = 0; ky < s->kh; ky++) {
                    const int32_t iy = oy * s->sh - s->ph + ky * s->dh;
                    if (iy < 0 || iy >= s->h) continue;
                    for (int32_t kx = 0; kx < s->kw; kx++) {
                        const int32_t ix = ox * s->sw - s->pw + kx * s->dw;
                        if (ix < 0 || ix >= s->w) continue;
                        const float v = xc[iy * s->w + ix];
                        if (at < 0 || v > mx || v != v) { mx = v; at = (int64_t)iy * s->w + ix; }
                    }
                }
                const size_t o = ((size_t)c * s->oh + oy) * s->ow + ox;
                y[o] = mx;
                idx[o] = at;
            }
    }
}

void gr_max_pool2d_bwd_f32(const float *gy, const int64_t *idx, float *gx, int32_t nc, int32_t hw, int32_t ohw) {
    memset(gx, 0, sizeof(float) * (size_t)nc * hw);
    for (int32_t c = 0; c < nc; c++)
        for (int32_t o = 0; o < ohw; o++) {
            const int64_t at = idx[(size_t)c * ohw + o];
            if (at >= 0) gx[(size_t)c * hw + at] += gy[(size_t)c * ohw + o];
        }
}

void gr_avg_pool2d_bwd_f32(const gr_pool_shape *s, const float *gy, float *gx) {
    memset(gx, 0, sizeof(float) * (size_t)s->nc * s->h * s->w);
    for (int32_t c = 0; c < s->nc; c++) {
        const float *gyp = gy + (size_t)c * s->oh * s->ow;
        float *gxp = gx + (size_t)c * s->h * s->w;
        for (int32_t oy = 0; oy < s->oh; oy++)
            for (int32_t ox = 0; ox < s->ow; ox++) {
                int32_t y0 = oy * s->sh - s->ph, x0 = ox * s->sw - s->pw;
                int32_t y1 = y0 + s->kh, x1 = x0 + s->kw;
                int32_t py1 = y1 < s->h + s->ph ? y1 : s->h + s->ph, px1 = x1 < s->w + s->pw ? x1 : s->w + s->pw;
                int32_t pool = (py1 - y0) * (px1 - x0);
                y0 = y0 > 0 ? y0 : 0; x0 = x0 > 0 ? x0 : 0;
                y1 = y1 < s->h ? y1 : s->h; x1 = x1 < s->w ? x1 : s->w;
                int32_t div = s->divisor ? s->divisor : (s->count_include_pad ? pool : (y1 - y0) * (x1 - x0));
                const float d = gyp[oy * s->ow + ox] / (float)div;
                for (int32_t iy = y0; iy < y1; iy++)
                    for (int32_t ix = x0; ix < x1; ix++) gxp[iy * s->w + ix] += d;
            }
    }
}

void gr_adaptive_avg_pool2d_bwd_f32(const float *gy, float *gx, int32_t nc, int32_t h, int32_t w,
                                    int32_t oh, int32_t ow) {
    memset(gx, 0, sizeof(float) * (size_t)nc * h * w);
    for (int32_t c = 0; c < nc; c++)
        for (int32_t oy = 0; oy < oh; oy++) {
            const int32_t y0 = oy * h / oh, y1 = ((oy + 1) * h + oh - 1) / oh;
            for (int32_t ox = 0; ox < ow; ox++) {
                const int32_t x0 = ox * w / ow, x1 = ((ox + 1) * w + ow - 1) / ow;
                const float d = gy[((size_t)c * oh + oy) * ow + ox] / (float)((y1 - y0) * (x1 - x0));
                for (int32_t iy = y0; iy < y1; iy++)
                    for (int32_t ix = x0; ix < x1; ix++) gx[((size_t)c * h + iy) * w + ix] += d;
            }
        }
}

void gr_add_bwd_reduce_f32(const float *gy, float *gb, int32_t outer, int32_t mid, int32_t inner) {
    for (int32_t m = 0; m < mid; m++) {
        float acc = 0.0f;
        for (int32_t o = 0; o < outer; o++)
            for (int32_t i = 0; i < inner; i++) acc += gy[((size_t)o * mid + m) * inner + i];
        gb[m] = acc;
    }
}

void gr_nll_loss_f32(const float *logp, const int64_t *target, float *loss, float *total_weight,
                     int32_t n, int32_t c, int64_t ignore_index, int32_t mean) {
    float acc = 0.0f, tw = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        if (target[i] == ignore_index) continue;
        acc -= logp[(size_t)i * c + target[i]];
        tw += 1.0f;
    }
    *total_weight = tw;
    *loss = mean ? acc / tw : acc;
}

void gr_nll_loss_bwd_f32(const float *gloss, const int64_t *target, const float *total_weight, float *gx,
                         int32_t n, int32_t c, int64_t ignore_index, int32_t mean) {
    const float d = mean ? -gloss[0] / total_weight[0] : -gloss[0];
    memset(gx, 0, sizeof(float) * (size_t)n * c);
    for (int32_t i = 0; i < n; i++)
        if (target[i] != ignore_index) gx[(size_t)i * c + target[i]] = d;
}

void gr_log_softmax_bwd_f32(const float *gy, const float *logp, float *gx, int32_t rows, int32_t cols) {
    for (int32_t r = 0; r < rows; r++) {
        const float *g = gy + (size_t)r * cols, *l = logp + (size_t)r * cols;
        float sum = 0.0f;
        for (int32_t j = 0; j < cols; j++) sum += g[j];
        for (int32_t j = 0; j < cols; j++) gx[(size_t)r * cols + j] = g[j] - gr_expf(l[j]) * sum;
    }
}

void gr_log_softmax_tr_f32(const float *x, float *y, int32_t rows, int32_t cols) {
    for (int32_t r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * cols;
        float mx = xr[0], sum = 0.0f;
        for (int32_t j = 1; j < cols; j++) mx = xr[j] > mx ? xr[j] : mx;
        for (int32_t j = 0; j < cols; j++) sum += gr_expf(xr[j] - mx);
        const float lse = gr_logf(sum);
        for (int32_t j = 0; j < cols; j++) y[(size_t)r * cols + j] = (xr[j] - mx) - lse;
    }
}

/* exp and log from float operations only (no libm), so that a numpy mirror of the
   same operations (backends/mcu/train_reference.py) gives the same bits. */
float gr_expf(float x) {
    if (x > 88.0f) return INFINITY;
    if (x < -87.0f) return 0.0f;     /* below the smallest normal float: flushed */
    const float k = floorf(x * 0x1.715476p+0f + 0.5f);             /* round(x / ln 2) */
    const float r = (x - k * 0x1.62e4p-1f) - k * 0x1.7f7d1cp-20f;  /* ln 2 = hi + lo, k * hi exact */
    float p = 0x1.6c16c2p-10f;                                    /* Taylor to r^6 on |r| <= ln2/2 */
    p = p * r + 0x1.111112p-7f;
    p = p * r + 0x1.555556p-5f;
    p = p * r + 0x1.555556p-3f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return ldexpf(p, (int)k);
}

float gr_logf(float x) {
    int e;
    float m = frexpf(x, &e);                  /* x = m 2^e, m in [0.5, 1) */
    if (m < 0x1.6a09e6p-1f) { m = m * 2.0f; e -= 1; }
    const float f = m - 1.0f, s = f / (2.0f + f), z = s * s;   /* log(1+f) = 2 atanh(s) */
    float p = 0x1.c71c72p-3f;
    p = p * z + 0x1.24924ap-2f;
    p = p * z + 0x1.99999ap-2f;
    p = p * z + 0x1.555556p-1f;
    p = p * z + 2.0f;
    return (float)e * 0x1.62e4p-1f + ((float)e * 0x1.7f7d1cp-20f + s * p);
}

void gr_softmax_xent_f32(const float *x, const int64_t *target, float *loss, float *gx, int32_t n, int32_t c) {
    float acc = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * c;
        float mx = xi[0], sum = 0.0f;
        for (int32_t j = 1; j < c; j++) mx = xi[j] > mx ? xi[j] : mx;
        for (int32_t j = 0; j < c; j++) sum += expf(xi[j] - mx);
        const float lse = mx + logf(sum);
        acc += lse - xi[target[i]];
        if (gx)
            for (int32_t j = 0; j < c; j++)
                gx[(size_t)i * c + j] = (expf(xi[j] - lse) - (j == target[i] ? 1.0f : 0.0f)) / (float)n;
    }
    *loss = acc / (float)n;
}

void gr_momentum_f32(float *v, const float *g, float momentum, int32_t n) {
    for (int32_t i = 0; i < n; i++) v[i] = momentum * v[i] + g[i];
}

void gr_sgd_f32(float *p, const float *g, float lr, int32_t n) {
    for (int32_t i = 0; i < n; i++) p[i] -= lr * g[i];
}
