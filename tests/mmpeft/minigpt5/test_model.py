"""MiniGPT-5's parts: voken positions and labels, the mapper, CFG dropout, and
that a saved model loads back with the same outputs."""

import io
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from PIL import Image

from mmpeft.data.conversation import ConversationEncoder, Sample
from mmpeft.data.stories import StoryStep, VokenDataset, caption_voken_sample, collate_vokens, story_samples
from mmpeft.data.templates import chat_template
from mmpeft.llava.model import llava_parts, llava_processor, load_base_models
from mmpeft.minigpt5.checkpoint import (
    assemble_minigpt5,
    empty_caption,
    load_minigpt5,
    mapper_settings,
    save_minigpt5,
    training_scheduler,
)
from mmpeft.minigpt5.model import LossWeights, MiniGPT5, VokenMapper, cfg_dropout, mapper_parts, voken_decisions
from mmpeft.models.trainable import LoraSettings, apply_trainability
from mmpeft.models.vokens import mask_forced_vokens, trainable_token_targets, voken_features, voken_starts
from mmpeft.presets import resolve_preset

MAPPER = {"d_model": 32, "heads": 2, "encoder_layers": 1, "decoder_layers": 1, "ff": 64}
CONFIGS = Path(__file__).resolve().parents[3] / "recipes" / "configs"


@pytest.fixture(scope="module")
def built(small_zoo):
    preset = resolve_preset("tiny", zoo_dir=small_zoo[0])
    lm, tokenizer, vision, image_processor = load_base_models(preset)
    pipeline = StableDiffusionPipeline.from_pretrained(preset.diffusion, safety_checker=None)
    torch.manual_seed(0)
    llava, voken_ids = assemble_minigpt5(lm, tokenizer, vision, pipeline, "<image>", 8, "mlp2x_gelu", -2)
    encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, "tokenizer"), "<image>",
                                  llava.config.image_seq_length, 64)
    return preset, llava, voken_ids, tokenizer, pipeline, encoder, image_processor, vision


def test_features_are_the_states_that_predict_each_voken():
    ids = torch.tensor([[5, 6, 10, 11, 12, 7, 0], [5, 10, 11, 12, 7, 0, 0]])
    starts = voken_starts(ids, [10, 11, 12])
    assert starts.tolist() == [[0, 2], [1, 1]]
    hidden = torch.arange(2 * 7, dtype=torch.float).reshape(2, 7, 1)
    # row 0: [IMG0] at 2 is predicted by position 1, [IMG2] at 4 by position 3
    assert voken_features(hidden, starts, 3)[..., 0].tolist() == [[1, 2, 3], [7, 8, 9]]


def test_an_incomplete_voken_run_is_an_error():
    with pytest.raises(ValueError, match="row 0"):
        voken_starts(torch.tensor([[5, 10, 12, 11]]), [10, 11, 12])
    with pytest.raises(ValueError, match="not \\[IMG0\\]"):
        voken_starts(torch.tensor([[10, 11, 12]]), [10, 11, 12])


def test_img0_and_the_end_of_turn_are_labels_the_forced_vokens_are_not(built):
    _, _, voken_ids, tokenizer, _, encoder, _, _ = built
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(png, format="PNG")  # the target image is checked up front
    sample = caption_voken_sample("s", png.getvalue(), "a red circle", "Draw: {caption}")
    item = VokenDataset([sample], encoder, voken_ids, lambda images: torch.zeros(len(images), 4, 8, 8))[0]
    ids, labels = item["input_ids"], item["labels"]
    start = ids.index(voken_ids[0])
    assert ids[start:start + 8] == voken_ids
    # [IMG0] decides that an image comes; [IMG1]..[IMG7] (the original leaves [IMG7] in) are appended by rule
    assert labels[start:start + 8] == [voken_ids[0]] + [-100] * 7
    assert labels[start + 8] == ids[start + 8] != -100  # the end of turn after the run
    assert all(lab == -100 for lab in labels[:start])  # the caption prompt carries no loss


def test_the_decisions_not_to_draw_are_a_text_answers_first_and_last_token(built):
    _, llava, voken_ids, tokenizer, _, _, image_processor, _ = built
    encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, "tokenizer"), "<image>",
                                  llava.config.image_seq_length, 192)
    steps = [StoryStep("A red circle appears.", Path("a.png")), StoryStep("The red circle grows.", Path("b.png"))]
    prompts = {"image": "Draw: {text}", "multimodal": "What next?", "text": "What is here?"}
    decided = {}
    for s in story_samples("s", steps, prompts, last_step_only=True):  # the three tasks of the second step
        row = encoder.encode_text(s.sample)
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([mask_forced_vokens(row["input_ids"], row["labels"], voken_ids)])
        decided[s.sample.id] = tokenizer.convert_ids_to_tokens(ids[voken_decisions(ids, labels, voken_ids)].tolist())
    first = tokenizer.tokenize("The red circle grows.")[0]
    # [IMG0] is predicted by its own voken feature and is left to the text loss; the end of
    # turn after [IMG7] decides nothing
    assert decided == {"s/1/image": [], "s/1/multimodal": [first], "s/1/text": [first, tokenizer.eos_token]}


def test_the_decision_term_lowers_img0_where_an_answer_does_not_draw(built):
    model, _ = _model(built, cfg_rate=0.0)
    model.weights = LossWeights(decision=2.0)
    model.eval()
    caption = _batch(built, n=1)
    assert model(**caption)["decision_loss"].item() == 0.0  # an answer that draws decides nothing here
    model.weights = LossWeights()
    assert "decision_loss" not in model(**caption)  # MiniGPT-5's weights: not computed, not logged
    model.weights = LossWeights(decision=2.0)
    encoder = built[5]
    text = Sample("t", [{"role": "user", "content": "What is here?"},
                        {"role": "assistant", "content": "A red circle."}])
    rows = [{**encoder.encode_text(caption_voken_sample("s", b"", "a caption", "Draw: {caption}").sample),
             "target_latents": caption["target_latents"], "caption_embeds": caption["caption_embeds"]},
            encoder.encode_text(text)]
    batch = collate_vokens(0)(rows)
    parts = model(**batch)
    with torch.no_grad():
        logits = model.llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labelled = torch.nonzero(batch["labels"][1] != -100)[:, 0]
    first, last = labelled[0].item(), labelled[-1].item()
    p_img0 = logits[1].softmax(-1)[:, model.voken_ids[0]]
    expected = -(torch.log1p(-p_img0[first - 1]) + torch.log1p(-p_img0[last - 1])) / 2
    assert torch.allclose(parts["decision_loss"], expected, atol=1e-5)
    assert torch.allclose(parts["loss"], 0.01 * parts["text_loss"] + parts["image_loss"] + 0.1 * parts["caption_loss"]
                          + 2.0 * parts["decision_loss"])


def test_the_vicuna_configs_keep_minigpt5s_weights_and_only_tiny_stage2_trains_the_decision():
    weights = {name: yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["loss"]["weights"]
               for name in ("minigpt5_stage1_tiny", "minigpt5_stage2_tiny", "minigpt5_stage1_vicuna",
                            "minigpt5_stage2_vicuna")}
    minigpt5 = {"text": 0.01, "image": 1.0, "caption": 0.1, "decision": 0.0}
    assert weights["minigpt5_stage1_vicuna"] == weights["minigpt5_stage2_vicuna"] == minigpt5
    assert weights["minigpt5_stage1_tiny"] == minigpt5  # one task, every answer an image: nothing to decide
    assert weights["minigpt5_stage2_tiny"]["decision"] > 0  # docs/findings.md: the tiny LM needs it


def test_mapper_output_has_the_loaded_unets_condition_shape(built):
    _, llava, _, _, pipeline, _, _, _ = built
    args = mapper_settings(llava.config.text_config.hidden_size, pipeline, **MAPPER)
    mapper = VokenMapper(**args)
    out = mapper(torch.randn(3, 8, args["llm_hidden"]))
    assert out.shape == (3, pipeline.tokenizer.model_max_length, pipeline.unet.config.cross_attention_dim)
    assert isinstance(mapper.out, torch.nn.Linear)  # d_model 32 != 128: a final projection
    assert torch.equal(mapper.unconditional(8), mapper(torch.zeros(1, 8, args["llm_hidden"])))


def test_cfg_dropout_drops_the_configured_fraction():
    torch.manual_seed(0)
    states = torch.ones(20000, 8, 4)
    out, dropped = cfg_dropout(states, 0.1)
    assert abs(dropped.float().mean().item() - 0.1) < 0.006  # binomial sd 0.0021
    assert torch.all(out[dropped] == 0) and torch.all(out[~dropped] == 1)


def _model(built, cfg_rate=0.1, lora=True):
    preset, llava, voken_ids, tokenizer, pipeline, encoder, image_processor, vision = built
    import copy

    llava = copy.deepcopy(llava)
    rows = {n: voken_ids for n in trainable_token_targets(llava).values()}
    choice = {"vision": "frozen", "connector": "full", "llm": "lora" if lora else "frozen"}
    llava = apply_trainability(llava, llava_parts(llava), choice, LoraSettings(4, 8, 0.0, ["q_proj", "v_proj"]),
                               token_rows=rows)
    args = mapper_settings(llava.config.text_config.hidden_size, pipeline, **MAPPER)
    mapper = VokenMapper(**args)
    model = MiniGPT5(llava, mapper, pipeline.unet, training_scheduler(pipeline), voken_ids, empty_caption(pipeline),
                     LossWeights(), cfg_rate, 5.0)
    return model, args


def _batch(built, n=3):
    encoder, pipeline = built[5], built[4]
    rows = []
    for k in range(n):
        s = caption_voken_sample(f"s{k}", b"", f"a caption {k}", "Draw: {caption}")
        rows.append({**encoder.encode_text(s.sample), "target_latents": torch.randn(1, 4, 8, 8),
                     "caption_embeds": torch.randn(1, pipeline.tokenizer.model_max_length,
                                                     pipeline.unet.config.cross_attention_dim)})
    return collate_vokens(0)(rows)


def test_only_voken_rows_lora_and_the_chosen_parts_train(built):
    model, _ = _model(built)
    for part, module in mapper_parts(model.mapper).items():
        module.requires_grad_(part == "transformer")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in names if "trainable_tokens" in n} == {
        "llava.base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta.default",
        "llava.base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"}
    assert all("trainable_tokens" in n or "lora_" in n or "multi_modal_projector" in n or "mapper.transformer" in n
               or n.startswith("mapper.out") for n in names)
    assert not any("unet" in n or "mapper.mlp" in n or "mapper.query" in n for n in names)
    delta = dict(model.named_parameters())[
        "llava.base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"]
    assert delta.shape == (8, model.llava_model.config.text_config.hidden_size)


def test_dropped_occurrences_are_conditioned_on_the_unconditional_embedding(built):
    model, _ = _model(built, cfg_rate=1.0)
    seen = []
    hook = model.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"]),
                                                with_kwargs=True)
    try:
        model.train()
        parts = model(**_batch(built))
    finally:
        hook.remove()
    uncond = model.mapper.unconditional(8)
    assert torch.allclose(seen[0], uncond.expand_as(seen[0]), atol=1e-6)
    expected = torch.nn.functional.mse_loss(uncond[0], model.empty_caption)  # caption target: the empty prompt
    assert torch.allclose(parts["caption_loss"], expected, atol=1e-6)
    assert torch.allclose(parts["loss"], 0.01 * parts["text_loss"] + parts["image_loss"] + 0.1 * parts["caption_loss"])


def _saved(built, folder, **recorded):
    """A model with every trainable weight moved (a stand-in for training), saved to `folder`
    with the settings a run records (plus `recorded`)."""
    model, args = _model(built)
    preset, _, _, tokenizer, _, _, image_processor, vision = built
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    processor = llava_processor(image_processor, tokenizer, vision.config)
    settings = {"sources": {"lm": preset.lm, "clip": preset.clip, "diffusion": preset.diffusion}, "mapper": args,
                "loss_weights": vars(LossWeights()), "cfg_rate": 0.1, "snr_gamma": 5.0, "connector": "mlp2x_gelu",
                "image_token": "<image>", "n_vokens": 8, "vision_feature_layer": -2,
                "trainable": {"llm": "lora"}, "qlora": False, **recorded}
    save_minigpt5(model, folder, processor, settings)
    return model


def test_saved_model_loads_back_with_the_same_outputs(built, tmp_path):
    model = _saved(built, tmp_path)
    loaded, _, _, _ = load_minigpt5(tmp_path)
    batch = _batch(built)
    for m in (model, loaded):
        m.eval()
    outs = []
    for m in (model, loaded):
        torch.manual_seed(1)
        outs.append(m(**batch))
    for key in ("text_loss", "image_loss", "caption_loss"):
        assert torch.allclose(outs[0][key], outs[1][key], atol=1e-6), key
    states = [m.voken_states(batch)[0] for m in (model, loaded)]
    assert torch.allclose(states[0], states[1], atol=1e-6)


def test_a_reload_puts_every_part_in_one_dtype(built, tmp_path):
    # the bases are published in float32 here; Vicuna's float16 next to SD's float32 is the
    # case this guards (tests/recipes/test_real_minigpt5.py loads that one)
    model = _saved(built, tmp_path, prediction_type="epsilon")
    loaded, _, pipeline, _ = load_minigpt5(tmp_path, dtype=torch.bfloat16)
    parts = {"model": loaded, "vae": pipeline.vae, "text_encoder": pipeline.text_encoder}
    # but the adapter's own weights, which PEFT keeps in float32 and casts around
    assert {name: {p.dtype for n, p in part.named_parameters() if "lora_" not in n and "trainable_tokens" not in n}
            for name, part in parts.items()} == {name: {torch.bfloat16} for name in parts}
    batch = {k: v for k, v in _batch(built, 1).items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():  # the LM's states feed the mapper, whose output feeds the UNet, all in bf16
        condition = loaded.mapper(loaded.voken_states(batch)[0])
        model.eval()
        expected = model.mapper(model.voken_states(batch)[0])
        latents = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
        assert loaded.unet(latents, torch.tensor([10]), encoder_hidden_states=condition).sample.dtype == torch.bfloat16
    assert condition.dtype == torch.bfloat16
    torch.testing.assert_close(condition.float(), expected, rtol=0.05, atol=0.05)


def test_a_reload_with_a_diffusion_model_of_another_target_is_an_error(built, tmp_path):
    _saved(built, tmp_path, prediction_type="v_prediction")  # the tiny SD predicts the noise
    with pytest.raises(ValueError, match=f"{tmp_path} trained against the v_prediction target, but the Stable "
                                         f"Diffusion at {built[0].diffusion} predicts epsilon; give the diffusion"):
        load_minigpt5(tmp_path)
