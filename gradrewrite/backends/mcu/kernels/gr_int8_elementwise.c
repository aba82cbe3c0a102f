/* int8 kernels between the int8 conv/linear layers: fan-out adds' partner (mul), average
 * pooling, table activations, concat and constant pad. TFLite-like fixed-point
 * semantics: int8 activations q = round(x / s) + zp, every rescale is one
 * requantization  r = (acc * mult + 2^(t-1)) >> t,  t = 31 - shift  (rounding half up,
 * CMSIS-NN's single-rounding requantize), then + out_zp and a clamp to [-128, 127].
 * The code generator computes every multiplier, table and zero point; the integer
 * reference (inference/reference.py) does the same arithmetic in numpy. */
#include <string.h>
#include "gr_kernels.h"

/* acc * mult * 2^(shift - 31), rounded half up: gr_requantize with the constants hoisted */
static inline int32_t rq(int32_t acc, int32_t mult, int32_t total) {
    int64_t prod = (int64_t)acc * mult + ((int64_t)1 << (total - 1));
    return (int32_t)(prod >> total);
}

static inline int8_t sat8(int32_t v) {
    return (int8_t)(v < -128 ? -128 : (v > 127 ? 127 : v));
}

void gr_lut_s8(const int8_t *x, int8_t *y, int32_t n, const int8_t *table) {
    const int8_t *t = table + 128;   /* indexed by the signed value */
    int32_t i;
    for (i = 0; i < n; i++) y[i] = t[x[i]];
}

void gr_mul_s8(const int8_t *a, int32_t a_zp, const int8_t *b, int32_t b_zp, int8_t *y,
               int32_t outer, int32_t inner, int32_t b_inner, int32_t mult, int32_t shift, int32_t out_zp,
               int32_t act_min, int32_t act_max) {
    const int32_t total = 31 - shift;
    int32_t o, i;
    for (o = 0; o < outer; o++) {
        const int8_t *ao = a + (size_t)o * inner;
        int8_t *yo = y + (size_t)o * inner;
        if (b_inner == 1) {   /* one b value per row: squeeze-excitation's channel gate */
            const int32_t bv = (int32_t)b[o] - b_zp;
            for (i = 0; i < inner; i++) {
                int32_t r = rq(((int32_t)ao[i] - a_zp) * bv, mult, total) + out_zp;
                yo[i] = (int8_t)(r < act_min ? act_min : (r > act_max ? act_max : r));
            }
        } else {
            const int8_t *bo = b + (size_t)o * inner;
            for (i = 0; i < inner; i++) {
                int32_t r = rq(((int32_t)ao[i] - a_zp) * ((int32_t)bo[i] - b_zp), mult, total) + out_zp;
                yo[i] = (int8_t)(r < act_min ? act_min : (r > act_max ? act_max : r));
            }
        }
    }
}

/* the divisor of one window edge as torch computes it: (end - start) over the padded
 * input for count_include_pad, the in-bounds part otherwise */
void gr_avg_pool2d_s8(const gr_pool_shape *s, const int8_t *x, int8_t *y, int32_t in_zp, int32_t out_zp,
                      const int32_t *mult, const int32_t *shift) {
    int32_t c, oy, ox, iy, ix;
    if (s->oh == 1 && s->ow == 1 && s->kh == s->h && s->kw == s->w && s->ph == 0 && s->pw == 0) {
        /* global pooling (the classifier's): one contiguous plane per channel, one divisor */
        const int32_t hw = s->h * s->w, d = s->divisor ? s->divisor : hw;
        const int32_t m = mult[d], t = 31 - shift[d], bias = in_zp * hw;
        for (c = 0; c < s->nc; c++) {
            const int8_t *xc = x + (size_t)c * hw;
            int32_t i, acc = 0;
            for (i = 0; i < hw; i++) acc += xc[i];
            y[c] = sat8(rq(acc - bias, m, t) + out_zp);
        }
        return;
    }
    for (c = 0; c < s->nc; c++) {
        const int8_t *xc = x + (size_t)c * s->h * s->w;
        for (oy = 0; oy < s->oh; oy++) {
            int32_t y0 = oy * s->sh - s->ph, y1 = y0 + s->kh;
            int32_t ph_ = (y1 < s->h + s->ph ? y1 : s->h + s->ph) - y0;
            if (y0 < 0) y0 = 0;
            if (y1 > s->h) y1 = s->h;
            for (ox = 0; ox < s->ow; ox++) {
                int32_t x0 = ox * s->sw - s->pw, x1 = x0 + s->kw, d, acc = 0;
                int32_t pw_ = (x1 < s->w + s->pw ? x1 : s->w + s->pw) - x0;
                if (x0 < 0) x0 = 0;
                if (x1 > s->w) x1 = s->w;
                for (iy = y0; iy < y1; iy++)
                    for (ix = x0; ix < x1; ix++) acc += xc[iy * s->w + ix];
                acc -= in_zp * (y1 - y0) * (x1 - x0);   /* sum of (x - in_zp) over the window */
                d = s->divisor ? s->divisor : (s->count_include_pad ? ph_ * pw_ : (y1 - y0) * (x1 - x0));
                /* mult/shift[d] ~= s_in / (s_out * d): a table over the divisors that occur */
                y[((size_t)c * s->oh + oy) * s->ow + ox] = d > 0 ? sat8(rq(acc, mult[d], 31 - shift[d]) + out_zp)
                                                                 : sat8(out_zp);
            }
        }
    }
}

/* y[o, :n] = rescale(x[o, :n]); r == NULL when input and output share scale and zero point */
static void rescale_rows(const int8_t *x, int32_t rows, int32_t n, int32_t x_stride, int8_t *y, int32_t y_stride,
                         const gr_rescale_s8 *r) {
    int32_t o, i;
    for (o = 0; o < rows; o++) {
        const int8_t *xo = x + (size_t)o * x_stride;
        int8_t *yo = y + (size_t)o * y_stride;
        if (r == NULL) {
            memcpy(yo, xo, (size_t)n);
        } else {
            const int32_t izp = r->in_zp, ozp = r->out_zp, m = r->mult, t = 31 - r->shift;
            for (i = 0; i < n; i++) yo[i] = sat8(rq((int32_t)xo[i] - izp, m, t) + ozp);
        }
    }
}

void gr_concat_s8(const int8_t *x, int32_t outer, int32_t inner, int32_t out_inner, int32_t offset,
                  const gr_rescale_s8 *r, int8_t *y) {
    rescale_rows(x, outer, inner, inner, y + offset, out_inner, r);
}

void gr_pad_s8(const int8_t *x, int8_t *y, int32_t outer, int32_t h, int32_t w, int32_t top, int32_t bottom,
               int32_t left, int32_t right, int32_t value, const gr_rescale_s8 *r) {
    const int32_t oh = h + top + bottom, ow = w + left + right;
    int32_t o;
    for (o = 0; o < outer; o++) {
        const int8_t *xo = x + (size_t)o * h * w;
        int8_t *yo = y + (size_t)o * oh * ow;
        int32_t row;
        memset(yo, value, (size_t)top * ow);
        for (row = 0; row < h; row++) {
            int8_t *yr = yo + (size_t)(row + top) * ow;
            memset(yr, value, (size_t)left);
            rescale_rows(xo + (size_t)row * w, 1, w, w, yr + left, ow, r);
            memset(yr + left + w, value, (size_t)right);
        }
        memset(yo + (size_t)(top + h) * ow, value, (size_t)bottom * ow);
    }
}

/* TFLite's int8 add, y = clamp(out_zp + requant(requant((a - a_zp) << 20, m[1], e[1])
 * + requant((b - b_zp) << 20, m[2], e[2]), m[0], e[0])): each input's rescaled term
 * requant((x - zp) << 20, m, e) depends on one int8 value only, so the code generator
 * tabulates it (ta, tb: 256 entries, indexed by x + 128) and one requantization per
 * element is left */
void gr_add_lut_s8(const int8_t *a, const int8_t *b, int8_t *y, int32_t n, const int32_t *ta, const int32_t *tb,
                   int32_t mult, int32_t shift, int32_t out_zp, int32_t act_min, int32_t act_max) {
    const int32_t *pa = ta + 128, *pb = tb + 128;
    const int32_t total = 31 - shift;
    const int64_t half = (int64_t)1 << (total - 1);
    int32_t i;
    if (total >= 32) {   /* the high word alone: no 64-bit shift */
        const int32_t rest = total - 32;
        for (i = 0; i < n; i++) {
            int64_t prod = (int64_t)(pa[a[i]] + pb[b[i]]) * mult + half;
            int32_t r = ((int32_t)(prod >> 32) >> rest) + out_zp;
            y[i] = (int8_t)(r < act_min ? act_min : (r > act_max ? act_max : r));
        }
    } else {
        for (i = 0; i < n; i++) {
            int32_t r = (int32_t)(((int64_t)(pa[a[i]] + pb[b[i]]) * mult + half) >> total) + out_zp;
            y[i] = (int8_t)(r < act_min ? act_min : (r > act_max ? act_max : r));
        }
    }
}
