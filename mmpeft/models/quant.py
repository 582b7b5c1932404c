"""4-bit (bitsandbytes NF4) models on CPU.

On CPUs with AVX512-BF16, bitsandbytes (0.50.2) repacks a 4-bit layer's weights in place
the first time the layer runs in eval mode without gradients (`Linear4bit.forward`), as
an inference speed-up. Two things break on that path:
- the repacking fails with a reshape error when the layer's input width is not a multiple
  of the quantization block size (`_convert_weight_packed_for_cpu`);
- a repacked weight that DeepSpeed ZeRO-3 has since partitioned cannot be unpacked when the
  state dict is saved (`_convert_weight_packed_for_cpu_inverse` asserts on its shape), and
  a recipe evaluates before it trains.
So every 4-bit layer stays on the plain dequantizing path, the one training uses anyway.
"""

from __future__ import annotations


def keep_cpu_4bit_working(model):
    """Turn off bitsandbytes' AVX512-BF16 weight repacking in every 4-bit layer of `model`;
    returns `model`."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model
