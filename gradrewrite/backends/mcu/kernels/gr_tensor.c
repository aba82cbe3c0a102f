/* Data movement: strided copies materialize views (transpose, permute, cat, slice)
 * only where a consumer needs contiguous data. */
#include <string.h>
#include "gr_kernels.h"

void gr_copy_nd(int32_t elem, int32_t ndim, const int32_t *shape,
                const void *src, const int32_t *src_strides,
                void *dst, const int32_t *dst_strides) {
    int32_t idx[GR_MAX_DIMS] = {0};
    int32_t total = 1, d, i;
    const uint8_t *s = (const uint8_t *)src;
    uint8_t *o = (uint8_t *)dst;
    for (d = 0; d < ndim; d++) total *= shape[d];
    if (ndim == 0) { memcpy(o, s, (size_t)elem); return; }
    for (i = 0; i < total; i++) {
        int32_t so = 0, doff = 0;
        for (d = 0; d < ndim; d++) { so += idx[d] * src_strides[d]; doff += idx[d] * dst_strides[d]; }
        if (elem == 4) *(uint32_t *)(void *)(o + (size_t)doff * 4) = *(const uint32_t *)(const void *)(s + (size_t)so * 4);
        else memcpy(o + (size_t)doff * (size_t)elem, s + (size_t)so * (size_t)elem, (size_t)elem);
        for (d = ndim - 1; d >= 0; d--) {
            if (++idx[d] < shape[d]) break;
            idx[d] = 0;
        }
    }
}

void gr_embedding_f32(const float *table, int32_t dim, const int64_t *idx, int32_t n, float *y) {
    int32_t i;
    for (i = 0; i < n; i++) memcpy(y + (size_t)i * dim, table + (size_t)idx[i] * dim, sizeof(float) * (size_t)dim);
}

void gr_cast_i64_f32(const int64_t *x, float *y, int32_t n) {
    int32_t i;
    for (i = 0; i < n; i++) y[i] = (float)x[i];
}
