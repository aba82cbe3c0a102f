/* N:M sparse conv / linear: only the kept weights are stored (values + a bitstream
 * of their positions inside each group of m), and only their multiply-accumulates
 * run. Each kept weight is decoded once and applied to every output pixel / row. */
#include "gr_kernels.h"

static int32_t nm_index(const uint8_t *stream, int32_t bits, int32_t i) {
    int32_t bit = i * bits, byte = bit >> 3;
    /* the generator pads the stream with one zero byte, so byte + 1 is readable */
    uint32_t word = (uint32_t)stream[byte] | ((uint32_t)stream[byte + 1] << 8);
    return (int32_t)((word >> (bit & 7)) & ((1u << bits) - 1u));
}

static float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

void gr_linear_nm_f32(const gr_nm *p, const float *x, const float *vals, const float *b,
                      float *y, int32_t rows_m, int32_t n_out, float lo, float hi) {
    int32_t j, g, s, i, per_row = p->groups * p->n;
    for (j = 0; j < n_out; j++) {
        for (i = 0; i < rows_m; i++) y[(size_t)i * n_out + j] = b ? b[j] : 0.0f;
        for (g = 0; g < p->groups; g++) for (s = 0; s < p->n; s++) {
            int32_t slot = j * per_row + g * p->n + s;
            int32_t col = g * p->m + nm_index(p->idx, p->bits, slot);
            float v = vals[slot];
            if (col >= p->k) continue;
            for (i = 0; i < rows_m; i++) y[(size_t)i * n_out + j] = GR_FMA(v, x[(size_t)i * p->k + col], y[(size_t)i * n_out + j]);
        }
        for (i = 0; i < rows_m; i++) y[(size_t)i * n_out + j] = clampf(y[(size_t)i * n_out + j], lo, hi);
    }
}

void gr_linear_nm_s8(const gr_nm *p, const gr_quant_params *q, const int8_t *x,
                     const int8_t *vals, const int32_t *bias, int8_t *y, int32_t rows_m, int32_t n_out,
                     int32_t *acc) {
    int32_t j, g, s, i, per_row = p->groups * p->n, zp = q->in_zp;
    for (j = 0; j < n_out; j++) {
        for (i = 0; i < rows_m; i++) acc[i] = bias ? bias[j] : 0;
        for (g = 0; g < p->groups; g++) for (s = 0; s < p->n; s++) {
            int32_t slot = j * per_row + g * p->n + s;
            int32_t col = g * p->m + nm_index(p->idx, p->bits, slot);
            int32_t v = vals[slot];
            if (col >= p->k || v == 0) continue;
            for (i = 0; i < rows_m; i++) acc[i] += v * ((int32_t)x[(size_t)i * p->k + col] - zp);
        }
        for (i = 0; i < rows_m; i++) {
            int32_t r = gr_requantize(acc[i], q->mult[j], q->shift[j]) + q->out_zp;
            y[(size_t)i * n_out + j] = (int8_t)(r < q->act_min ? q->act_min : (r > q->act_max ? q->act_max : r));
        }
    }
}

/* rows of the grouped weight are (o, ky, kx); K runs over the input channels of o's group */
#define NM_CONV_LOOP(ACC, XVAL)                                                              \
    for (ky = 0; ky < s->kh; ky++) for (kx = 0; kx < s->kw; kx++) {                          \
        int32_t row = (o * s->kh + ky) * s->kw + kx, oy0 = 0, oy1 = s->oh, ox0 = 0, ox1 = s->ow; \
        while (oy0 < oy1 && oy0 * s->sh - s->ph + ky * s->dh < 0) oy0++;                     \
        while (oy1 > oy0 && (oy1 - 1) * s->sh - s->ph + ky * s->dh >= s->h) oy1--;            \
        while (ox0 < ox1 && ox0 * s->sw - s->pw + kx * s->dw < 0) ox0++;                      \
        while (ox1 > ox0 && (ox1 - 1) * s->sw - s->pw + kx * s->dw >= s->w) ox1--;            \
        for (gi = 0; gi < p->groups; gi++) for (sl = 0; sl < p->n; sl++) {                    \
            int32_t slot = (row * p->groups + gi) * p->n + sl;                                \
            int32_t c = gi * p->m + nm_index(p->idx, p->bits, slot);                         \
            const XVAL *xc;                                                                   \
            if (c >= p->k || vals[slot] == 0) continue;                                       \
            xc = x + (((size_t)n * s->c + (size_t)grp * cin_g + c) * s->h) * s->w;            \
            for (oy = oy0; oy < oy1; oy++) {                                                  \
                const XVAL *xr = xc + (size_t)(oy * s->sh - s->ph + ky * s->dh) * s->w - s->pw + kx * s->dw; \
                for (ox = ox0; ox < ox1; ox++) ACC;                                           \
            }                                                                                 \
        }                                                                                     \
    }

void gr_conv2d_nm_f32(const gr_conv_shape *s, const gr_nm *p, const float *x, const float *vals,
                      const float *b, float *y, float lo, float hi) {
    int32_t cin_g = s->c / s->groups, cout_g = s->oc / s->groups, hw = s->oh * s->ow;
    int32_t n, o, oy, ox, ky, kx, gi, sl, i;
    for (n = 0; n < s->n; n++) for (o = 0; o < s->oc; o++) {
        int32_t grp = o / cout_g;
        float *yo = y + ((size_t)n * s->oc + o) * hw;
        for (i = 0; i < hw; i++) yo[i] = b ? b[o] : 0.0f;
        NM_CONV_LOOP(yo[oy * s->ow + ox] += vals[slot] * xr[ox * s->sw], float)
        for (i = 0; i < hw; i++) yo[i] = clampf(yo[i], lo, hi);
    }
}

void gr_conv2d_nm_s8(const gr_conv_shape *s, const gr_nm *p, const gr_quant_params *q,
                     const int8_t *x, const int8_t *vals, const int32_t *bias, int8_t *y,
                     int32_t *acc) {
    int32_t cin_g = s->c / s->groups, cout_g = s->oc / s->groups, hw = s->oh * s->ow;
    int32_t n, o, oy, ox, ky, kx, gi, sl, i, zp = q->in_zp;
    for (n = 0; n < s->n; n++) for (o = 0; o < s->oc; o++) {
        int32_t grp = o / cout_g;
        int8_t *yo = y + ((size_t)n * s->oc + o) * hw;
        for (i = 0; i < hw; i++) acc[i] = bias ? bias[o] : 0;
        NM_CONV_LOOP(acc[oy * s->ow + ox] += (int32_t)vals[slot] * ((int32_t)xr[ox * s->sw] - zp), int8_t)
        for (i = 0; i < hw; i++) {
            int32_t r = gr_requantize(acc[i], q->mult[o], q->shift[o]) + q->out_zp;
            yo[i] = (int8_t)(r < q->act_min ? q->act_min : (r > q->act_max ? q->act_max : r));
        }
    }
}
