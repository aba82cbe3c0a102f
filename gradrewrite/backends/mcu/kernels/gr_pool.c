/* Pooling (fp32, NCHW with N*C folded into nc). */
#include <math.h>
#include "gr_kernels.h"

void gr_max_pool2d_f32(const gr_pool_shape *s, const float *x, float *y) {
    int32_t c, oy, ox, ky, kx;
    for (c = 0; c < s->nc; c++) {
        const float *xc = x + (size_t)c * s->h * s->w;
        for (oy = 0; oy < s->oh; oy++) for (ox = 0; ox < s->ow; ox++) {
            float mx = -INFINITY;
            for (ky = 0; ky < s->kh; ky++) {
                int32_t iy = oy * s->sh - s->ph + ky * s->dh;
                if (iy < 0 || iy >= s->h) continue;
                for (kx = 0; kx < s->kw; kx++) {
                    int32_t ix = ox * s->sw - s->pw + kx * s->dw;
                    float v;
                    if (ix < 0 || ix >= s->w) continue;
                    v = xc[iy * s->w + ix];
                    if (v > mx || v != v) mx = v;
                }
            }
            y[((size_t)c * s->oh + oy) * s->ow + ox] = mx;
        }
    }
}

void gr_avg_pool2d_f32(const gr_pool_shape *s, const float *x, float *y) {
    int32_t c, oy, ox, iy, ix;
    for (c = 0; c < s->nc; c++) {
        const float *xc = x + (size_t)c * s->h * s->w;
        for (oy = 0; oy < s->oh; oy++) for (ox = 0; ox < s->ow; ox++) {
            int32_t y0 = oy * s->sh - s->ph, x0 = ox * s->sw - s->pw;
            int32_t y1 = y0 + s->kh, x1 = x0 + s->kw, count;
            float acc = 0.0f;
            if (y1 > s->h + s->ph) y1 = s->h + s->ph;
            if (x1 > s->w + s->pw) x1 = s->w + s->pw;
            count = (y1 - y0) * (x1 - x0);
            if (y0 < 0) y0 = 0;
            if (x0 < 0) x0 = 0;
            if (y1 > s->h) y1 = s->h;
            if (x1 > s->w) x1 = s->w;
            if (!s->count_include_pad) count = (y1 - y0) * (x1 - x0);
            if (s->divisor) count = s->divisor;
            for (iy = y0; iy < y1; iy++) for (ix = x0; ix < x1; ix++) acc += xc[iy * s->w + ix];
            y[((size_t)c * s->oh + oy) * s->ow + ox] = acc / (float)count;
        }
    }
}

void gr_adaptive_avg_pool2d_f32(const float *x, float *y, int32_t nc, int32_t h, int32_t w,
                                int32_t oh, int32_t ow) {
    int32_t c, oy, ox, iy, ix;
    for (c = 0; c < nc; c++) {
        const float *xc = x + (size_t)c * h * w;
        for (oy = 0; oy < oh; oy++) {
            int32_t y0 = (oy * h) / oh, y1 = ((oy + 1) * h + oh - 1) / oh;
            for (ox = 0; ox < ow; ox++) {
                int32_t x0 = (ox * w) / ow, x1 = ((ox + 1) * w + ow - 1) / ow;
                float acc = 0.0f;
                for (iy = y0; iy < y1; iy++) for (ix = x0; ix < x1; ix++) acc += xc[iy * w + ix];
                y[((size_t)c * oh + oy) * ow + ox] = acc / (float)((y1 - y0) * (x1 - x0));
            }
        }
    }
}
