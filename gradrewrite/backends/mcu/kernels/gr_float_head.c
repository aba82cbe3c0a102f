/* the float head of an int8 training step (see gr_float_head.h) */
#include <stddef.h>
#include "gr_float_head.h"

void gr_linear_tr_f32(const float *x, const float *w, const float *b, float *y, int32_t rows, int32_t kin,
                      int32_t nout) {
    for (int32_t r = 0; r < rows; r++)
        for (int32_t o = 0; o < nout; o++) {
            float acc = b ? b[o] : 0.0f;
            for (int32_t i = 0; i < kin; i++) acc += x[(size_t)r * kin + i] * w[(size_t)o * kin + i];
            y[(size_t)r * nout + o] = acc;
        }
}
