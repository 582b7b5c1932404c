"""4-bit (bitsandbytes NF4) models on CPU.

On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights the first time the
layer runs in eval mode without gradients (`Linear4bit.forward`). In bitsandbytes 0.50.2
that repacking fails with a reshape error when the layer's input width is not a multiple
of the quantization block size (`_convert_weight_packed_for_cpu` reshapes the block scales
to `in_features // blocksize` columns). Layers like that stay on the plain dequantizing
path; every other layer keeps the fast one.
"""

from __future__ import annotations


def keep_cpu_4bit_working(model):
    """Turn off bitsandbytes' AVX512-BF16 repacking for the 4-bit layers of `model` whose
    input width is not a multiple of their block size; returns `model`."""
    for module in model.modules():
        if type(module).__name__ != "Linear4bit" or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is not None and module.in_features % state.blocksize:
            module.support_avx512bf16_for_cpu = False
    return model
