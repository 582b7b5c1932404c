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

On those CPUs, importing bitsandbytes (peft imports it whenever it is installed) also logs
"Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'".
That kernel only ever runs on repacked weights (`matmul_4bit` checks `packing_format_for_cpu`),
so mmpeft never uses it; installing `kernels` would only have bitsandbytes download it from
the Hub on import. That one note is dropped; every other bitsandbytes message still shows.
"""

from __future__ import annotations

import logging

BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_kernels_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(KERNELS_NOTE)


def quiet_bitsandbytes_import() -> None:
    """Drop bitsandbytes' note about the missing kernels-community CPU kernel, which mmpeft
    never uses (see the module docstring). It is logged while bitsandbytes is imported, so
    call this before the first `import peft` or `import bitsandbytes`; calling it again
    changes nothing."""
    logging.getLogger(BNB_CPU_OPS_LOGGER).addFilter(_not_the_kernels_note)


def keep_cpu_4bit_working(model):
    """Turn off bitsandbytes' AVX512-BF16 weight repacking in every 4-bit layer of `model`;
    returns `model`."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model
