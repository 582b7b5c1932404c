"""GILL's renormalisation of the `[IMG]` rows after each step, on a tied OPT under DeepSpeed
bf16 with ZeRO-2, where the optimizer steps a float32 copy of the rows: that copy must be
rescaled too, or the next step starts from the rows as they were before."""

import json
import subprocess
import sys

import pytest

_SCRIPT = """
import json, sys, torch, deepspeed
from deepspeed.utils import safe_get_full_fp32_param
from transformers import OPTConfig, OPTForCausalLM
from mmpeft.gill.model import TokenRowRenormaliser
from mmpeft.models.trainable import apply_trainability
from mmpeft.train.loop import setup_distributed

setup_distributed()
torch.manual_seed(0)
lm = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                              word_embed_proj_dim=16, max_position_embeddings=32))
ids = [60, 61]
lm = apply_trainability(lm, {"llm": lm.base_model}, {"llm": "frozen"}, token_rows={"model.decoder.embed_tokens": ids})
optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=0.5)
engine, *_ = deepspeed.initialize(model=lm, optimizer=optimizer, config={
    "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
x = torch.tensor([[1, 60, 61, 5]])
renormalise = TokenRowRenormaliser(lm)
norms = []
for _ in range(2):
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    if sys.argv[1] == "renormalise":
        renormalise()
    rows = lm.get_input_embeddings().trainable_tokens_delta["default"]
    norms.append({"master": safe_get_full_fp32_param(rows).norm(dim=-1).tolist(),
                  "rows": rows.float().norm(dim=-1).tolist()})
target = lm.get_input_embeddings().base_layer.weight[:60].float().norm(dim=-1).mean().item()
print(json.dumps({"norms": norms, "target": target}))
"""


def _run(mode):
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rows_and_the_optimizers_float32_copy_are_rescaled_after_every_step():
    out = _run("renormalise")
    for step in out["norms"]:
        assert step["master"] == pytest.approx([out["target"]] * 2, rel=1e-5)
        assert step["rows"] == pytest.approx([out["target"]] * 2, rel=1e-2)  # bf16 rounding
    untouched = _run("leave")  # the same steps without it: the rows drift away from the target
    assert all(abs(n - untouched["target"]) > 0.05 * untouched["target"] for n in untouched["norms"][-1]["master"])
