"""Static int8 Q/DQ in the form OpenVINO's CPU plugin runs as int8 kernels.

The quantize pass writes int8 activations with a zero point (``quantize_per_tensor(...,
-128, 127, torch.int8)``: a ReLU6 output is ``[0, 6]`` at zero point -128). OpenVINO's ONNX
frontend reads each QuantizeLinear / DequantizeLinear pair as a FakeQuantize followed by
``Convert(i8) -> Convert(f32) -> Subtract(zero point) -> Multiply(scale)``; its
low-precision transformations then keep a signed activation with a non-zero zero point
in float: the CPU plugin's int8 convolutions take an activation zero point only for
uint8 data. Measured on MobileNetV2-w0.35 @128 (OpenVINO 2026.4, Sapphire Rapids, the
compiled model's ``primitiveType``): 51 of 52 convs ran ``brgconv_avx512_*_f32`` on
dequantized weights and the 10 residual adds ran as separate eltwise nodes -- f32 speed
(3.7 ms against NNCF's 1.35 ms at batch 1, 1 thread, loaded machine), although every layer's
``runtimePrecision`` read i8.

``openvino_form`` rewrites every activation Q/DQ pair to uint8 with zero point ``z + 128``
(``ort_int8.activations_to_uint8``: the same integers shifted, so the dequantized values
are unchanged, exactly). A ReLU(6) output then has zero point 0 -- the symmetric unsigned
form NNCF writes -- and a signed one (a projection conv, a residual sum) an unsigned zero
point the plugin compensates. Same model: all 52 convs run ``brgconv_*_I8`` (AMX/VNNI),
the residual adds fused into the convs (sum post-ops), 1.45 ms against NNCF's 1.35.
Values only linear layers read (every activation quantizer of a transformer) stay int8:
OpenVINO runs those FullyConnected layers int8 in either form (``brgemm_avx512_amx_i8``), and
the uint8 one measured slower on MiniLM at batch 8 (101 ms against 92, 1 thread, load ~15).
Weights stay int8 per channel (zero point 0), biases float (the plugin folds them into its
int8 kernels' output scaling itself); linear weights stay behind their ``Transpose``, which
the frontend folds into the constant.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .ort_int8 import activations_to_uint8


def _linear_inputs_only(dequantizes) -> bool:
    """Every reader of the dequantized value is a MatMul / Gemm (a linear layer's input):
    the pair stays int8, which OpenVINO's FullyConnected runs as an int8 kernel as it is."""
    readers = [u.node for dq in dequantizes for u in dq.outputs[0].uses()]
    return bool(readers) and all(r.op_type in ("MatMul", "Gemm") and r.domain in ("", "ai.onnx") for r in readers)


def openvino_form(path: Path) -> tuple[Path, dict[str, Any]]:
    """The ONNX file at ``path`` in OpenVINO's form (see the module docstring), written
    beside it (``path`` itself when nothing changed); returns the file to read and the
    counts for the report (``{"quantize": n, "dequantize": n, "kept_int8": n}``)."""
    import onnx_ir as ir

    model = ir.load(str(path))
    done = activations_to_uint8(model, keep=_linear_inputs_only)
    if not done["quantize"]:
        return path, done
    out = path.with_name(path.stem + "_openvino.onnx")
    external = Path(str(path) + ".data").exists()
    ir.save(model, str(out), external_data=out.name + ".data" if external else None)
    return out, done


__all__ = ["openvino_form"]
