import torch
from transformers import BitsAndBytesConfig

from mmpeft.presets import load_lm, resolve_preset


def test_a_4bit_lm_runs_in_eval_mode_on_cpu_whatever_its_layer_widths(small_zoo):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    lm, tokenizer = load_lm(resolve_preset("tiny", zoo_dir=small_zoo[0]), quantization_config=quant)
    layers = [m for m in lm.modules() if type(m).__name__ == "Linear4bit"]
    odd = [m for m in layers if m.in_features % m.weight.quant_state.blocksize]
    assert odd and len(odd) < len(layers)  # the tiny LM has widths bitsandbytes cannot repack, and others
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    with torch.no_grad():  # where the repacking happens, on CPUs that have AVX512-BF16
        logits = lm.eval()(**tokenizer("A red square.", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_a_4bit_lm_loads_on_each_ranks_own_gpu():
    from mmpeft.llava.model import qlora_device_map

    assert qlora_device_map({"LOCAL_RANK": "3"}, cuda=True) == {"": 3}
    assert qlora_device_map({}, cuda=True) == {"": 0}  # a plain `python` run: the first GPU
    assert qlora_device_map({"LOCAL_RANK": "3"}, cuda=False) is None  # CPU: bitsandbytes' CPU backend
