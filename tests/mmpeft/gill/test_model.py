"""GILL's parts: the positions each head reads, the image pass's labels, the symmetric
contrastive loss, its gathering across ranks, trainable rows, caption concatenation, the
decision prompts file, eval mode for the frozen LM, and the retrieval index on disk."""

import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPModel, CLIPProcessor

from mmpeft.data.conversation import ConversationEncoder
from mmpeft.data.readers import read_caption_shards
from mmpeft.data.templates import chat_template
from mmpeft.gill.checkpoint import build_gill
from mmpeft.gill.data import ClipEmbeddings, GillDataset, collate_gill, concat_captions, image_pass_labels
from mmpeft.gill.decision import read_decision_prompts
from mmpeft.gill.model import RetrievalHead, contrastive_loss, generation_loss
from mmpeft.gill.retrieval_index import RetrievalIndex, images_in
from mmpeft.minigpt5.checkpoint import mapper_settings
from mmpeft.models.trainable import LoraSettings, apply_trainability, frozen_modules
from mmpeft.models.vokens import trainable_token_targets
from mmpeft.presets import load_lm, resolve_preset
from mmpeft.train.modes import train_mode

MAPPER = {"d_model": 32, "heads": 2, "encoder_layers": 1, "decoder_layers": 1, "ff": 64}


@pytest.fixture(scope="module")
def gill(small_zoo):
    preset = resolve_preset("tiny", zoo_dir=small_zoo[0])
    lm, tokenizer = load_lm(preset)
    pipe = StableDiffusionPipeline.from_pretrained(preset.diffusion, safety_checker=None)
    torch.manual_seed(0)
    model = build_gill(lm, tokenizer, 16, "<image>", 8, 4, 8,
                       mapper_settings(lm.config.hidden_size, pipe, **MAPPER, input_layers=1), 0.0)
    return model.eval(), tokenizer


def test_retrieval_reads_the_state_at_img0_and_the_mapper_states_plus_embeddings_at_every_img(gill):
    model, tokenizer = gill
    ids = torch.tensor([[5, 6, 7, *model.voken_ids, 2]])
    _, at0, mapper_in = model.image_pass(ids, torch.ones_like(ids))
    out = model.lm(input_ids=ids, output_hidden_states=True)
    hidden, embeds = out.hidden_states[-1][0], model.lm.get_input_embeddings()(ids)[0]
    assert torch.allclose(at0[0], hidden[3], atol=1e-5)  # [IMG0] sits at position 3
    assert torch.allclose(mapper_in[0], hidden[3:11] + embeds[3:11], atol=1e-5)


def test_the_image_pass_labels_stop_at_img0():
    assert image_pass_labels([1, 2, 30, 31, 32, 9], [-100, 2, 30, -100, -100, 9], [30, 31, 32]) == [
        -100, 2, 30, -100, -100, -100]


def test_the_image_pass_lm_loss_leaves_the_img_input_rows_to_the_heads(gill, small_world):
    # GILL's labels end at [IMG0]; a chat template's end-of-turn token after [IMG7] was a label read
    # from the [IMG] input rows, whose gradient outweighed the retrieval and generation losses' there
    import copy

    model, tokenizer = gill
    encoder = ConversationEncoder(tokenizer, None, chat_template(tokenizer, "tokenizer"), "<image>", 4, 96)
    pairs = read_caption_shards(f"{small_world}/wds/train/*.tar")[:2]
    item = GillDataset(pairs, encoder, model.voken_ids, "{caption}", None, None).items[0][3]
    ids, labels = item["input_ids"], item["labels"]
    img0 = ids.index(model.voken_ids[0])
    assert len(ids) > img0 + 8  # the template ends the turn after [IMG7]
    assert [k for k, lab in enumerate(labels) if lab != -100] == [img0]
    lm = copy.deepcopy(model.lm)
    rows = {n: model.voken_ids for n in trainable_token_targets(lm).values()}
    lm = apply_trainability(lm, {"llm": lm.base_model}, {"llm": "frozen"}, LoraSettings(), token_rows=rows)
    lm(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
    grads = {n.split(".")[-3]: p.grad for n, p in lm.named_parameters() if p.requires_grad}
    assert grads["embed_tokens"] is None or not grads["embed_tokens"].any()
    assert grads["lm_head"].any()  # the [IMG] output rows still learn when an image comes


def test_image_tokens_take_the_mapped_clip_embedding(gill):
    model, _ = gill
    ids = torch.tensor([[5] + [model.image_token_id] * 4 + [6]])
    clip = torch.randn(1, 16)
    embeds = model.input_embeddings(ids, clip)
    assert torch.allclose(embeds[0, 1:5], model.image_input(clip)[0])
    assert torch.allclose(embeds[0, 0], model.lm.get_input_embeddings()(torch.tensor(5)))
    with pytest.raises(ValueError, match="4 image token slots but 2 image"):
        model.input_embeddings(ids, torch.randn(2, 16))


def test_symmetric_infonce_matches_a_hand_computation():
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = contrastive_loss(text, image, torch.zeros(1))  # scale e^0 = 1: logits = text @ image.T

    def ce(row, k):
        return -row[k] + math.log(sum(math.exp(v) for v in row))

    t2i = (ce([1.0, 0.0], 0) + ce([0.6, 0.8], 1)) / 2
    i2t = (ce([1.0, 0.6], 0) + ce([0.0, 0.8], 1)) / 2
    assert loss.item() == pytest.approx((t2i + i2t) / 2, abs=1e-6)
    assert RetrievalHead(4, 4).log_scale.exp().item() == pytest.approx(1 / 0.07)


def test_generation_loss_is_the_mean_per_token_l2_distance():
    a, b = torch.zeros(1, 2, 3), torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]])
    assert generation_loss(a, b).item() == pytest.approx((5 + 1) / 2)


_RANK = """
import datetime, json, sys, torch
from mmpeft.gill.model import contrastive_loss
rank, folder = int(sys.argv[1]), sys.argv[2]
text, image = torch.load(folder + "/inputs.pt")
torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                                     timeout=datetime.timedelta(seconds=60))
t = text[rank * 2:(rank + 1) * 2].clone().requires_grad_(True)
loss = contrastive_loss(t, image[rank * 2:(rank + 1) * 2], torch.zeros(1))
loss.backward()
json.dump([loss.item(), t.grad.tolist()], open(f"{folder}/rank{rank}.json", "w"))
torch.distributed.destroy_process_group()
"""


def test_the_loss_on_two_ranks_uses_every_ranks_embeddings(tmp_path, two_ranks):
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    torch.save((text, image), tmp_path / "inputs.pt")
    text.requires_grad_(True)
    whole = contrastive_loss(text, image, torch.zeros(1))
    whole.backward()
    whole = whole.item()
    results = two_ranks(_RANK)
    assert results[0][0] == pytest.approx(whole, abs=1e-6) and results[1][0] == pytest.approx(whole, abs=1e-6)
    # as GILL: each rank's rows get the whole batch's gradient once (a differentiable gather
    # would add the other rank's loss and double it)
    for rank in (0, 1):
        torch.testing.assert_close(torch.tensor(results[rank][1]), text.grad[rank * 2:(rank + 1) * 2])
    halves = [contrastive_loss(text[k:k + 2], image[k:k + 2], torch.zeros(1)).item() for k in (0, 2)]
    assert all(abs(h - whole) > 1e-3 for h in halves)  # without gathering the loss would differ


def test_only_the_img_rows_of_a_frozen_lm_train(gill):
    import copy

    model, _ = gill
    lm = copy.deepcopy(model.lm)
    rows = {n: model.voken_ids for n in trainable_token_targets(lm).values()}
    wrapped = apply_trainability(lm, {"llm": lm.base_model}, {"llm": "frozen"}, LoraSettings(), token_rows=rows)
    names = sorted(n for n, p in wrapped.named_parameters() if p.requires_grad)
    assert names == ["base_model.model.lm_head.trainable_tokens_delta.default",
                     "base_model.model.model.embed_tokens.trainable_tokens_delta.default"]


def test_index_saves_and_loads_and_finds_an_image_by_its_own_embedding(small_world, small_zoo, tmp_path):
    zoo = small_zoo[0]
    clip = CLIPModel.from_pretrained(zoo / "clip")
    embed = ClipEmbeddings(clip.vision_model, CLIPProcessor.from_pretrained(zoo / "clip").image_processor)
    images = images_in(small_world / "coco/test")[:6]
    index = RetrievalIndex.build(images, embed, str(zoo / "clip"))
    loaded = RetrievalIndex.load(index.save(tmp_path / "index"))
    assert torch.equal(loaded.embeddings, index.embeddings) and loaded.items == [str(p) for p in images]
    head = RetrievalHead(loaded.embeddings.shape[1], loaded.embeddings.shape[1], 16)
    with torch.no_grad():
        head.text.weight.copy_(head.image.weight)
        head.text.bias.copy_(head.image.bias)
    scores, top = loaded.search(head, loaded.embeddings[[2, 4]], k=3)
    assert top[:, 0].tolist() == [2, 4] and scores.shape == (2, 3)
    with pytest.raises(FileNotFoundError, match="no retrieval index"):
        RetrievalIndex.load(tmp_path)


def test_index_from_a_saved_dataset_holds_its_images_as_files(small_world, small_zoo, tmp_path):
    import datasets
    from PIL import Image

    from mmpeft.gill.retrieval_index import main

    files = images_in(small_world / "coco/test")[:3]
    rows = {"image": [Image.open(p).convert("RGB") for p in files], "caption": ["a", "b", "c"]}
    datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string")})).save_to_disk(tmp_path / "data")
    main([str(tmp_path / "data"), str(tmp_path / "index"), "--clip", str(small_zoo[0] / "clip"), "--dataset"])
    index = RetrievalIndex.load(tmp_path / "index")
    assert [Path(p).name for p in index.items] == ["0000000.png", "0000001.png", "0000002.png"]
    assert all(Path(p).is_file() for p in index.items) and index.embeddings.shape[0] == 3
    with pytest.raises(ValueError, match="no column 'picture'; its columns: image, caption"):
        main([str(tmp_path / "data"), str(tmp_path / "index2"), "--clip", str(small_zoo[0] / "clip"), "--dataset",
              "--image-column", "picture"])


def test_concat_captions_joins_each_captioning_sequence_with_the_next_and_keeps_image_order():
    rows = [{"input_ids": [2, 7, 10 + k], "labels": [-100, -100, 10 + k], "img_input_ids": [2, 99],
             "img_labels": [-100, 99], "clip_embeds": torch.full((1, 3), float(k)),
             "target_clip": torch.full((1, 3), float(k)), "caption_embeds": torch.zeros(1, 2, 2)} for k in range(3)]
    joined = concat_captions(rows, lead=1)
    assert [r["input_ids"] for r in joined] == [[2, 7, 10, 7, 11], [2, 7, 11, 7, 12], [2, 7, 12, 7, 10]]
    assert [r["labels"] for r in joined][0] == [-100, -100, 10, -100, 11]
    assert [r["clip_embeds"][:, 0].tolist() for r in joined] == [[0, 1], [1, 2], [2, 0]]
    assert all(r["img_input_ids"] == [2, 99] for r in joined)  # the image passes stay as they are
    always, never = collate_gill(0, concat_p=1.0, lead=1)(rows), collate_gill(0, concat_p=0.0, lead=1)(rows)
    assert always["input_ids"].shape == (3, 5) and always["clip_embeds"].shape == (6, 3)
    assert never["input_ids"].shape == (3, 3) and never["clip_embeds"].shape == (3, 3)
    # about half the batches are joined at p 0.5, the same ones on every call
    draws = [collate_gill(0, concat_p=0.5, lead=1, seed=s)(rows)["input_ids"].shape[1] == 5 for s in range(200)]
    assert 70 < sum(draws) < 130
    assert draws == [collate_gill(0, concat_p=0.5, lead=1, seed=s)(rows)["input_ids"].shape[1] == 5
                     for s in range(200)]


def test_decision_prompts_read_from_jsonl_and_tsv_and_bad_rows_are_named(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"prompt": "a red circle", "decision": "retrieve"}\n\n{"prompt": "a dragon", "decision": '
                     '"Generate"}\n')
    prompts, labels = read_decision_prompts(jsonl)
    assert prompts == ["a red circle", "a dragon"] and labels.tolist() == [0, 1]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("Prompt\tCategory\tDecision\na cat\tanimals\tretrieve\n")
    assert read_decision_prompts(tsv)[1].tolist() == [0]
    jsonl.write_text('{"prompt": "a", "decision": "both"}\n{"decision": "retrieve"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl: line 1: decision 'both' is not retrieve or generate; "
                                         r"line 2: no prompt"):
        read_decision_prompts(jsonl)
    tsv.write_text("text\tlabel\nx\ty\n")
    with pytest.raises(ValueError, match="the header must name a prompt and a decision column"):
        read_decision_prompts(tsv)


def test_a_frozen_lm_with_trainable_img_rows_runs_in_eval_mode(gill):
    import copy

    model, _ = gill
    lm = copy.deepcopy(model.lm)
    parts, choice = {"llm": lm.base_model}, {"llm": "frozen"}
    rows = {n: model.voken_ids for n in trainable_token_targets(lm).values()}
    wrapped = apply_trainability(lm, parts, choice, LoraSettings(), token_rows=rows)
    train_mode(wrapped, frozen_modules(parts, choice))
    assert not parts["llm"].training and all(not m.training for m in parts["llm"].modules())
    assert any(p.requires_grad for p in parts["llm"].parameters())  # the [IMG] rows still train
