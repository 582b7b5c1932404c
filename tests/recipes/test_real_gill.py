"""GILL's real config (`gill_opt.yaml`: OPT-6.7B, CLIP ViT-L/14, SD 1.5) through its real
launch command for two steps on the stand-ins (see `mmpeft.standins.build`) and the small
world's caption shards, with a small labelled prompts file for the decision head.

Every setting of the YAML stays as it is (bf16, ZeRO-2, GILL's format, heads, weights and
optimizer) except `OVERRIDES` and the paths."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import mmpeft
from mmpeft.export import export_run
from mmpeft.standins.build import build_standins

OVERRIDES = ("training.max_steps=2", "training.micro_batch_size=2", "threads=1", "training.log_steps=1",
             "eval.decision.steps=20")
UNIFORM_LOSS = math.log(50274)  # random stand-in: about a uniform guess over OPT's rows and the new ones


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return build_standins(tmp_path_factory.mktemp("standins"))


@pytest.fixture(scope="module")
def run(run_shipped_config, standins, small_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gill_opt")
    prompts = {"train": tmp / "decision_train.jsonl", "test": tmp / "decision_test.tsv"}
    rows = [("a photo of a red circle", "retrieve"), ("a dragon reading a newspaper on the moon", "generate")] * 4
    prompts["train"].write_text("".join(json.dumps({"prompt": p, "decision": d}) + "\n" for p, d in rows))
    prompts["test"].write_text("Prompt\tCategory\tDecision\n" + "".join(f"{p}\tx\t{d}\n" for p, d in rows[:2]))
    out = tmp / "gill-opt-6.7b"
    stdout = run_shipped_config(
        "gill.py", "gill_opt.yaml", f"model.lm_path={standins['opt']}", f"model.clip_path={standins['clip224']}",
        f"model.diffusion_path={standins['sd15']}", f"data.train.path={small_world / 'wds/train/*.tar'}",
        f"data.target_cache={tmp / 'targets'}", f"eval.decision.train={prompts['train']}",
        f"eval.decision.test={prompts['test']}", f"training.output_dir={out}", *OVERRIDES, timeout=900)
    return out, stdout


def test_gill_opt_config_trains_on_the_opt_standin(run):
    out, stdout = run
    assert "has no safetensors weights, so its pytorch_model*.bin was read" in stdout  # OPT's .bin-only layout
    assert "data: " in stdout and " caption pairs from " in stdout
    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["history"]
    assert len(history) == 2
    for step in history:
        assert abs(step["caption_loss"] - UNIFORM_LOSS) < 0.5 and abs(step["image_lm_loss"] - UNIFORM_LOSS) < 0.5
        assert step["loss"] == pytest.approx(step["caption_loss"] + step["image_lm_loss"] + step["retrieval_loss"]
                                             + step["generation_loss"], rel=1e-4)  # GILL's weights: all 1
    settings = json.loads((out / "mmpeft_config.json").read_text())
    assert settings["build"]["base_tokens"] == 50265 and settings["build"]["retrieval_dim"] == 256
    assert settings["config"]["data"]["conversation_format"] == "gill"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"decision_train_loss", "decision_accuracy", "decision_majority"} <= set(metrics)
    assert not (out / "index").exists()  # labelled prompts name no images to index


def test_img_rows_train_on_the_tied_lm_renormalised_and_reload(run, standins):
    out, _ = run
    loaded = mmpeft.load(out, lm=str(standins["opt"]), clip=str(standins["clip224"]),
                         diffusion=str(standins["sd15"]))
    model, tokenizer = loaded.model, loaded.processor
    ids = tokenizer.convert_tokens_to_ids(["<image>", *[f"[IMG{i}]" for i in range(8)]])
    assert ids == list(range(50265, 50274))  # past OPT's 50,265 tokens, over its padding rows
    lm = model.lm
    rows = lm.get_input_embeddings()(torch.tensor(ids)).float()
    vocabulary = lm.get_base_model().get_input_embeddings().base_layer.weight[:50265].float()
    start = vocabulary.mean(0)  # new rows start at the mean of the trained rows, not on padding rows
    torch.testing.assert_close(rows[0], start)  # <image>: never trained
    assert all((r - start).abs().max() > 1e-3 for r in rows[1:])  # the [IMG] rows trained ...
    # ... and were rescaled after each step to the vocabulary's mean norm (GILL's renormalisation)
    torch.testing.assert_close(rows[1:].norm(dim=-1), vocabulary.norm(dim=-1).mean().expand(8), rtol=1e-2, atol=0)
    # tied: the head scores [IMG0] with the same trained row
    hidden = torch.randn(1, 1, rows.shape[1])
    logits = lm.get_output_embeddings()(hidden)[0, 0]
    torch.testing.assert_close(logits[ids[1:]], hidden[0, 0] @ rows[1:].T, rtol=1e-4, atol=1e-4)


def test_export_is_a_plain_tied_opt_with_the_trained_rows(run, standins, tmp_path):
    out, _ = run
    exported = export_run(out, tmp_path / "export", lm=str(standins["opt"]))
    lm = AutoModelForCausalLM.from_pretrained(exported)
    assert lm.dtype == torch.float16  # OPT's published dtype, not a float32 copy
    loaded = mmpeft.load(out, lm=str(standins["opt"]))
    ids = list(range(50266, 50274))
    weight = lm.get_input_embeddings().weight
    assert weight.shape == (50274, 64) and lm.get_output_embeddings().weight is weight  # still tied
    trained = loaded.model.lm.get_input_embeddings()(torch.tensor(ids)).float()
    torch.testing.assert_close(weight[ids].float(), trained, rtol=1e-3, atol=1e-3)
    assert (exported / "gill_heads.safetensors").is_file()
