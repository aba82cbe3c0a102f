/* Host harness for a generated training step: train_host INPUT LABEL STEPS LR OUT
   runs STEPS calls of model_train_step on one batch and writes to OUT the loss of
   every step (float32), then the bytes of every trained parameter (model order). */
#include <stdio.h>
#include <stdlib.h>
#include "model.h"

static int read_exact(const char *path, void *buf, long n) {
    FILE *f = fopen(path, "rb");
    if (!f) return 1;
    long got = (long)fread(buf, 1, (size_t)n, f);
    int extra = fgetc(f) != EOF;
    fclose(f);
    return got != n || extra;
}

int main(int argc, char **argv) {
    static unsigned char input[MODEL_INPUT_BYTES], label[MODEL_LABEL_BYTES];
    if (argc != 6) { fprintf(stderr, "usage: %s INPUT LABEL STEPS LR OUT\n", argv[0]); return 2; }
    if (read_exact(argv[1], input, MODEL_INPUT_BYTES) || read_exact(argv[2], label, MODEL_LABEL_BYTES)) {
        fprintf(stderr, "input or label file has the wrong size\n");
        return 2;
    }
    int steps = atoi(argv[3]);
    float lr = strtof(argv[4], NULL);
    FILE *out = fopen(argv[5], "wb");
    if (!out) return 2;
    for (int i = 0; i < steps; i++) {
        float loss = 0.0f;
        if (model_train_step(input, label, lr, &loss) != 0) return 1;
        fwrite(&loss, sizeof loss, 1, out);
    }
    for (int p = 0; p < MODEL_NUM_TRAINED; p++)
        fwrite(model_trained_params[p], 1, (size_t)model_trained_bytes[p], out);
    fclose(out);
    return 0;
}
