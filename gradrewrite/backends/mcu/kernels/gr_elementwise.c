/* Elementwise, normalization and reduction kernels (fp32). */
#include <math.h>
#include <string.h>
#include "gr_kernels.h"

static float apply(int32_t op, float a, float b) {
    switch (op) {
    case GR_ADD: return a + b;
    case GR_SUB: return a - b;
    case GR_MUL: return a * b;
    case GR_DIV: return a / b;
    case GR_MAX: return a > b ? a : b;
    default: return a < b ? a : b;
    }
}

void gr_binary_f32(int32_t op, int32_t ndim, const int32_t *shape,
                   const float *a, const int32_t *a_strides,
                   const float *b, const int32_t *b_strides, float alpha, float *y) {
    int32_t idx[GR_MAX_DIMS] = {0};
    int32_t total = 1, d, i, inner = ndim > 0 ? shape[ndim - 1] : 1;
    int32_t sa = ndim > 0 ? a_strides[ndim - 1] : 0, sb = ndim > 0 ? b_strides[ndim - 1] : 0;
    for (d = 0; d < ndim; d++) total *= shape[d];
    /* walk rows of the innermost dimension; the outer index is kept in idx */
    for (i = 0; i < total; i += inner) {
        int32_t ao = 0, bo = 0, j;
        const float *pa, *pb;
        for (d = 0; d < ndim - 1; d++) { ao += idx[d] * a_strides[d]; bo += idx[d] * b_strides[d]; }
        pa = a + ao; pb = b + bo;
        if (op == GR_ADD && alpha == 1.0f && sa == 1 && sb == 1) {
            for (j = 0; j < inner; j++) y[i + j] = pa[j] + pb[j];
        } else {
            for (j = 0; j < inner; j++) y[i + j] = apply(op, pa[j * sa], alpha * pb[j * sb]);
        }
        for (d = ndim - 2; d >= 0; d--) {
            if (++idx[d] < shape[d]) break;
            idx[d] = 0;
        }
    }
}

void gr_binary_scalar_f32(int32_t op, const float *x, float s, float *y, int32_t n) {
    int32_t i;
    for (i = 0; i < n; i++) y[i] = apply(op, x[i], s);
}

void gr_unary_f32(int32_t op, const float *x, float *y, int32_t n, float lo, float hi) {
    int32_t i;
    switch (op) {
    case GR_CLAMP:
        for (i = 0; i < n; i++) { float v = x[i]; y[i] = v < lo ? lo : (v > hi ? hi : v); }
        break;
    case GR_HARDSWISH:
        for (i = 0; i < n; i++) { float v = x[i], r = v + 3.0f; r = r < 0.0f ? 0.0f : (r > 6.0f ? 6.0f : r); y[i] = v * r / 6.0f; }
        break;
    case GR_HARDSIGMOID:
        for (i = 0; i < n; i++) { float r = x[i] + 3.0f; r = r < 0.0f ? 0.0f : (r > 6.0f ? 6.0f : r); y[i] = r / 6.0f; }
        break;
    case GR_SIGMOID:
        for (i = 0; i < n; i++) y[i] = 1.0f / (1.0f + expf(-x[i]));
        break;
    case GR_TANH:
        for (i = 0; i < n; i++) y[i] = tanhf(x[i]);
        break;
    case GR_GELU_ERF:
        for (i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
        break;
    case GR_GELU_TANH:
        for (i = 0; i < n; i++) {
            float v = x[i];
            y[i] = 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
        }
        break;
    case GR_SILU:
        for (i = 0; i < n; i++) y[i] = x[i] / (1.0f + expf(-x[i]));
        break;
    case GR_NEG:
        for (i = 0; i < n; i++) y[i] = -x[i];
        break;
    case GR_EXP:
        for (i = 0; i < n; i++) y[i] = expf(x[i]);
        break;
    case GR_SQRT:
        for (i = 0; i < n; i++) y[i] = sqrtf(x[i]);
        break;
    default: /* GR_RSQRT */
        for (i = 0; i < n; i++) y[i] = 1.0f / sqrtf(x[i]);
        break;
    }
}

void gr_softmax_f32(const float *x, float *y, int32_t rows, int32_t cols, int32_t log) {
    int32_t r, c;
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * cols;
        float *yr = y + (size_t)r * cols;
        float mx = xr[0], sum = 0.0f;
        for (c = 1; c < cols; c++) if (xr[c] > mx) mx = xr[c];
        if (log) {
            for (c = 0; c < cols; c++) sum += expf(xr[c] - mx);
            sum = logf(sum);
            for (c = 0; c < cols; c++) yr[c] = xr[c] - mx - sum;
        } else {
            for (c = 0; c < cols; c++) { float e = expf(xr[c] - mx); yr[c] = e; sum += e; }
            sum = 1.0f / sum;
            for (c = 0; c < cols; c++) yr[c] *= sum;
        }
    }
}

void gr_layer_norm_f32(const float *x, const float *gamma, const float *beta, float *y,
                       int32_t rows, int32_t cols, float eps) {
    int32_t r, c;
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * cols;
        float *yr = y + (size_t)r * cols;
        float mean = 0.0f, var = 0.0f, inv;
        for (c = 0; c < cols; c++) mean += xr[c];
        mean /= (float)cols;
        for (c = 0; c < cols; c++) { float d = xr[c] - mean; var += d * d; }
        inv = 1.0f / sqrtf(var / (float)cols + eps);
        for (c = 0; c < cols; c++) {
            float v = (xr[c] - mean) * inv;
            if (gamma) v *= gamma[c];
            if (beta) v += beta[c];
            yr[c] = v;
        }
    }
}

void gr_reduce_f32(const float *x, float *y, int32_t outer, int32_t red, int32_t inner, int32_t mean) {
    int32_t o, r, i;
    for (o = 0; o < outer; o++) {
        for (i = 0; i < inner; i++) {
            float acc = 0.0f;
            for (r = 0; r < red; r++) acc += x[((size_t)o * red + r) * inner + i];
            y[(size_t)o * inner + i] = mean ? acc / (float)red : acc;
        }
    }
}

void gr_pad_f32(const float *x, float *y, int32_t outer, int32_t h, int32_t w, int32_t top, int32_t bottom,
                int32_t left, int32_t right, float value) {
    const int32_t oh = h + top + bottom, ow = w + left + right;
    int32_t o, r, c;
    for (o = 0; o < outer; o++) {
        const float *xo = x + (size_t)o * h * w;
        float *yo = y + (size_t)o * oh * ow;
        for (r = 0; r < oh; r++) {
            float *yr = yo + (size_t)r * ow;
            if (r < top || r >= top + h) {
                for (c = 0; c < ow; c++) yr[c] = value;
                continue;
            }
            for (c = 0; c < left; c++) yr[c] = value;
            memcpy(yr + left, xo + (size_t)(r - top) * w, (size_t)w * sizeof(float));
            for (c = left + w; c < ow; c++) yr[c] = value;
        }
    }
}
