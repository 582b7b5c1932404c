"""The LLaVA recipes run as users run them, for a few steps on the small world and zoo."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mmpeft.llava.checkpoint import load_llava

ROOT = Path(__file__).resolve().parents[2]
EXPORT_FILES = {"chat_template.jinja", "connector.safetensors", "mmpeft_config.json", "processor_config.json",
                "tokenizer.json", "tokenizer_config.json"}
LORA_FILES = {"adapter_config.json", "adapter_model.safetensors", "llava_adapter"}
CHECKPOINT_FILES = {"ds", "rng_rank0.pt", "trainer_state.json", "training.png"}
RUN_REPORT = {"metrics.jsonl", "runs", "training.png"}  # mmpeft.train.reporting: metrics, TensorBoard, plot


def _command(script, out, world, zoo, *overrides, launcher="python", resume=None):
    cmd = [sys.executable, str(ROOT / "recipes" / script)] if launcher == "python" else \
        [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", str(ROOT / "recipes" / script)]
    cmd += (["--resume", str(resume)] if resume else []) + [
        f"fixture.world_dir={world}", f"fixture.zoo_dir={zoo}", f"training.output_dir={out}", "training.max_steps=4",
        "training.save_steps=2", "training.micro_batch_size=4", "training.log_steps=1", "eval.limit=6", "threads=1",
        f"data.feature_cache={Path(out).parent / 'features'}", f"data.prepared={Path(out).parent / 'prepared'}",
        *overrides]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(script, out, world, zoo, *overrides, launcher="python", resume=None):
    cmd, env = _command(script, out, world, zoo, *overrides, launcher=launcher, resume=resume)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _history(folder):
    return json.loads((Path(folder) / "trainer_state.json").read_text())["history"]


@pytest.fixture(scope="module")
def stage1(small_world, small_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava") / "stage1"
    stdout = _run("llava_pretrain.py", out, small_world, small_zoo[0], launcher="deepspeed")
    return out, stdout


@pytest.fixture(scope="module")
def stage2(stage1, small_world, small_zoo):
    out = stage1[0].parent / "stage2"
    # stage 1 reads cached features; stage 2 runs the tower on images decoded in two loader processes
    stdout = _run("llava_finetune.py", out, small_world, small_zoo[0], f"model.init_connector={stage1[0]}",
                  "data.feature_cache=null", "training.num_workers=2")
    return out, stdout


def test_stage1_trains_the_connector_and_writes_exactly_its_files(stage1):
    out, stdout = stage1
    assert {p.name for p in out.iterdir()} == EXPORT_FILES | RUN_REPORT | {"checkpoint-2", "checkpoint-4",
                                                                      "metrics.json"}
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == EXPORT_FILES | CHECKPOINT_FILES
    losses = [h["loss"] for h in _history(out / "checkpoint-4")]
    assert len(losses) == 4 and 5.0 < losses[0] < 7.0 and losses[-1] < losses[0]
    assert "trainable ({'vision': 'frozen', 'connector': 'full', 'llm': 'frozen'})" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["first_loss"] == losses[0] and metrics["last_loss"] == losses[-1]


def test_stage2_writes_adapter_connector_and_processor_in_every_checkpoint(stage2, stage1):
    out, stdout = stage2
    assert f"connector: from stage 1 at {stage1[0]}" in stdout
    assert {p.name for p in out.iterdir()} == EXPORT_FILES | LORA_FILES | RUN_REPORT | {"checkpoint-2", "checkpoint-4",
                                                                                          "metrics.json"}
    for step in (2, 4):
        assert {p.name for p in (out / f"checkpoint-{step}").iterdir()} == EXPORT_FILES | LORA_FILES | CHECKPOINT_FILES
    losses = [h["loss"] for h in _history(out / "checkpoint-4")]
    assert losses[-1] < losses[0]
    metrics = json.loads((out / "metrics.json").read_text())  # beside its control: each image swapped for another
    assert metrics["image_gap"] == pytest.approx(metrics["answer_accuracy_after"]
                                                 - metrics["answer_accuracy_image_swapped"])
    assert set(metrics["by_type_image_swapped"]) == set(metrics["by_type_after"])
    assert "with each image swapped for another" in stdout


def test_any_checkpoint_reloads_in_one_call_with_the_same_outputs(stage2):
    out, _ = stage2
    final, processor, settings = load_llava(out)
    last, _, _ = load_llava(out / "checkpoint-4")
    middle, _, _ = load_llava(out / "checkpoint-2")
    ids = processor.tokenizer("How many objects are in the image?", return_tensors="pt").input_ids
    pixels = torch.randn(1, 3, 64, 64)
    image_ids = torch.cat([torch.full((1, 16), final.config.image_token_id), ids], dim=1)
    with torch.no_grad():
        a = final(input_ids=image_ids, pixel_values=pixels).logits
        b = last(input_ids=image_ids, pixel_values=pixels).logits
        c = middle(input_ids=image_ids, pixel_values=pixels).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert settings["trainable"] == {"vision": "frozen", "connector": "full", "llm": "lora"}


def test_lm_adapter_loads_with_plain_peft_onto_the_base_lm(stage2):
    out, _ = stage2
    llava, processor, settings = load_llava(out)
    base = AutoModelForCausalLM.from_pretrained(settings["sources"]["lm"])
    base.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    ids = processor.tokenizer("What colour is the circle?", return_tensors="pt").input_ids
    with torch.no_grad():  # the image token's new rows, as the recipe set them
        for matrix in (base.get_input_embeddings(), base.get_output_embeddings()):
            matrix.weight[-1] = matrix.weight[:-1].mean(0)
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
        torch.testing.assert_close(after, llava(input_ids=ids).logits)
    assert not torch.allclose(before, after)


def test_killed_run_resumes_and_ends_where_the_uninterrupted_one_does(stage2, stage1, small_world, small_zoo):
    out, _ = stage2
    killed = out.parent / "stage2_killed"
    cmd, env = _command("llava_finetune.py", killed, small_world, small_zoo[0], f"model.init_connector={stage1[0]}",
                        "data.feature_cache=null")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-2" / "trainer_state.json").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "metrics.json").exists()
    assert not (killed / "checkpoint-4" / "trainer_state.json").exists()  # killed mid-run
    stdout = _run("llava_finetune.py", killed, small_world, small_zoo[0], f"model.init_connector={stage1[0]}",
                  "data.feature_cache=null", resume="latest")
    assert f"resumed from {killed / 'checkpoint-2'} at step 2" in stdout
    full, again = _history(out / "checkpoint-4"), _history(killed / "checkpoint-4")
    assert [h["step"] for h in again] == [1, 2, 3, 4]
    for a, b in zip(full, again, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_stage2_reads_a_hugging_face_messages_dataset(stage1, small_world, small_zoo):
    import datasets

    records = json.loads((small_world / "llava/train.json").read_text())[:12]
    rows = {"id": [], "messages": [], "images": []}
    for rec in records:
        rows["id"].append(rec["id"])
        rows["messages"].append([{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                                 for t in rec["conversations"]])
        rows["images"].append([str(small_world / "coco" / rec["image"])] if "image" in rec else [])
    folder = stage1[0].parent / "hf_messages"
    datasets.Dataset.from_dict(rows).cast_column("images", datasets.Sequence(datasets.Image())).save_to_disk(folder)
    out = stage1[0].parent / "stage2_hf"
    stdout = _run("llava_finetune.py", out, small_world, small_zoo[0], f"model.init_connector={stage1[0]}",
                  "data.train.format=messages_dataset", f"data.train.path={folder}", "training.max_steps=2")
    assert f"data: 12 conversations from {folder}" in stdout
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists()


def test_a_bad_record_ends_the_run_in_one_line_or_is_skipped_and_counted(stage1, small_world, small_zoo):
    records = json.loads((small_world / "llava/train.json").read_text())[:8]
    records[3] = {"id": "bad-3", "conversations": [{"from": "robot", "value": "hi"}]}
    records[5]["conversations"].insert(0, {"from": "gpt", "value": "Hello."})  # LLaVA drops such a first turn
    train = stage1[0].parent / "with_bad.json"
    train.write_text(json.dumps(records))
    out = stage1[0].parent / "stage2_bad"
    overrides = (f"model.init_connector={stage1[0]}", f"data.train.path={train}", "training.max_steps=1",
                 "eval.questions=null")
    cmd, env = _command("llava_finetune.py", out, small_world, small_zoo[0], *overrides)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (f"error: {train}: record bad-3: unknown speaker(s) ['robot']; data.skip_bad_records=true leaves such "
            "records out and counts them") in proc.stderr
    stdout = _run("llava_finetune.py", out, small_world, small_zoo[0], *overrides, "data.skip_bad_records=true")
    assert "data: 7 conversations from" in stdout
    assert ("skipped 1 record(s): 1 unknown speaker (ids: bad-3); 1 conversation(s) opened with an assistant "
            "turn, dropped as LLaVA does") in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped"] == {"unknown speaker": 1} and metrics["leading_assistant_turns_dropped"] == 1


def test_qlora_under_zero3_saves_gathered_weights(stage1, small_world, small_zoo):
    from safetensors.torch import load_file

    out = stage1[0].parent / "stage2_qlora_zero3"
    stdout = _run("llava_finetune.py", out, small_world, small_zoo[0], f"model.init_connector={stage1[0]}",
                  "model.qlora=true", "training.ds_config=ds_configs/zero3.json", "training.max_steps=2",
                  launcher="deepspeed")
    assert "qlora True" in stdout
    adapter = load_file(out / "adapter_model.safetensors")
    connector = load_file(out / "connector.safetensors")
    assert len(adapter) == 4 * 7 * 2  # every LoRA matrix of the 4 layers, none an empty shard
    assert all(t.numel() > 0 for t in adapter.values()) and all(t.numel() > 0 for t in connector.values())
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # trained, not the zero init
    assert connector["linear_1.weight"].shape == (128, 128)
    model, _, settings = load_llava(out)  # rebuilt on the same 4-bit base it trained on
    assert settings["qlora"] and any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert json.loads((out / "metrics.json").read_text())["answer_accuracy_after"] >= 0


def test_loss_curve_is_the_same_on_one_and_two_ranks_under_zero2_and_zero3(stage1, small_world, small_zoo):
    common = (f"model.init_connector={stage1[0]}", "model.lora.dropout=0.0", "training.max_steps=3",
              "training.save_steps=3", "eval.limit=2")
    runs = {
        "zero2, 1 rank": ("ds_configs/zero2.json", 1, 4, 1),
        "zero3, 2 ranks": ("ds_configs/zero3.json", 2, 2, 1),
        "zero2, 2 ranks": ("ds_configs/zero2.json", 2, 2, 1),
        "zero3, 1 rank, accumulation 2": ("ds_configs/zero3.json", 1, 2, 2),
    }
    curves = {}
    for name, (ds, ranks, micro, accum) in runs.items():
        out = stage1[0].parent / f"curve {name}".replace(" ", "_").replace(",", "")
        cmd, env = _command("llava_finetune.py", out, small_world, small_zoo[0], *common,
                            f"training.ds_config={ds}", f"training.micro_batch_size={micro}",
                            f"training.grad_accum={accum}", launcher="deepspeed")
        cmd[cmd.index("--num_gpus") + 1] = str(ranks)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # under ZeRO-3 each rank loads only its shard of the LM
        assert (f"LM: loaded partitioned over {ranks} rank(s)" in proc.stdout) == ds.endswith("zero3.json"), name
        curves[name] = [h["loss"] for h in _history(out / "checkpoint-3")]
    reference = curves.pop("zero2, 1 rank")
    for name, curve in curves.items():
        assert curve == pytest.approx(reference, rel=1e-3), name


def test_mmpeft_load_rebuilds_the_run_and_export_is_native_with_the_same_generation(stage2, small_world, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline

    import mmpeft
    from mmpeft.export import export_run

    out, _ = stage2
    model, processor, _ = load_llava(out)
    loaded = mmpeft.load(out)
    image = Image.open(sorted((small_world / "coco" / "test").glob("*.jpg"))[0]).convert("RGB")
    prompt = "<image>\nWhat colour is the circle?"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
        before = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    exported = export_run(out, tmp_path / "export")
    assert not (exported / "adapter_config.json").exists() and (exported / "model.safetensors").exists()
    native = LlavaForConditionalGeneration.from_pretrained(exported).eval()  # no mmpeft code from here on
    native_processor = AutoProcessor.from_pretrained(exported)
    native_inputs = native_processor(images=image, text=prompt, return_tensors="pt")
    torch.testing.assert_close(native_inputs["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        after = native.generate(**native_inputs, max_new_tokens=8, do_sample=False)
        torch.testing.assert_close(native(**native_inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)
    assert after.tolist() == before.tolist()
    served = pipeline("image-text-to-text", model=str(exported))(images=image, text=prompt, max_new_tokens=8,
                                                                  do_sample=False, return_full_text=False)
    new_tokens = before[0, inputs["input_ids"].shape[1]:]
    assert served[0]["generated_text"] == processor.tokenizer.decode(new_tokens, skip_special_tokens=True)
    with pytest.raises(ValueError, match="merged export"):
        mmpeft.load(exported)


@pytest.fixture(scope="module")
def released(stage2):
    """Stage 2's run exported as a native transformers LLaVA, as `llava-hf/llava-1.5-7b-hf` is published."""
    from mmpeft.export import export_run

    return export_run(stage2[0], stage2[0].parent / "released")


def _first_records(small_world, folder, n=4):
    """The first `n` image conversations of the world as a training file: one micro-batch of `n` is then
    the whole of every epoch, so the first step's loss is the model's loss on exactly these."""
    records = [r for r in json.loads((small_world / "llava/train.json").read_text()) if "image" in r][:n]
    path = folder / "first_records.json"
    path.write_text(json.dumps(records))
    return path


def test_stage2_from_a_released_llava_starts_from_its_weights_and_reloads(released, small_world, small_zoo):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import mmpeft
    from mmpeft.data.conversation import ConversationEncoder
    from mmpeft.data.dataset import ConversationDataset, collate_conversations
    from mmpeft.data.readers import read_llava_json
    from mmpeft.data.templates import chat_template

    train = _first_records(small_world, released.parent)
    out = released.parent / "stage2_from_released"
    stdout = _run("llava_finetune.py", out, small_world, small_zoo[0], f"model.init_from={released}",
                  "model.init_connector=null", "data.feature_cache=null", f"data.train.path={train}",
                  "training.max_steps=2")
    assert f"model: from {released}, its image token '<image>' and vision_feature_layer -2" in stdout
    # no LM-alone adapter: the run has no separate base LM; llava_adapter/ goes onto the checkpoint itself
    assert {p.name for p in out.iterdir()} == EXPORT_FILES | RUN_REPORT | {"llava_adapter", "checkpoint-2",
                                                                      "metrics.json"}
    settings = json.loads((out / "mmpeft_config.json").read_text())
    assert settings["sources"] == {"llava": str(released)} and settings["image_token"] == "<image>"

    native = LlavaForConditionalGeneration.from_pretrained(released).eval()  # no mmpeft code
    processor = AutoProcessor.from_pretrained(released)
    tokenizer = processor.tokenizer
    encoder = ConversationEncoder(tokenizer, processor.image_processor, chat_template(tokenizer, "tokenizer"),
                                  "<image>", native.config.image_seq_length, 256)
    dataset = ConversationDataset(read_llava_json(train, small_world / "coco"), encoder)
    batch = collate_conversations(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():  # step 1's loss is the step-0 model's: the checkpoint's weights, LoRA still zero
        assert _history(out / "checkpoint-2")[0]["loss"] == pytest.approx(native(**batch).loss.item(), rel=1e-5)

    loaded = mmpeft.load(out)
    inputs = {k: v[:1] for k, v in batch.items() if k != "labels"}  # the first conversation and its image
    with torch.no_grad():
        base = native(**inputs).logits
        trained = loaded.model(**inputs).logits
        on_checkpoint = PeftModel.from_pretrained(native, out / "llava_adapter").eval()(**inputs).logits
    assert loaded.settings["sources"] == {"llava": str(released)}
    torch.testing.assert_close(trained, on_checkpoint, rtol=0, atol=1e-6)  # plain PEFT on the checkpoint agrees
    assert not torch.allclose(trained, base, atol=1e-4)  # and it is the trained model, not the checkpoint


def test_qlora_from_a_released_llava_keeps_the_vision_tower_and_projector_unquantized(released, small_world,
                                                                                      small_zoo):
    out = released.parent / "stage2_from_released_qlora"
    stdout = _run("llava_finetune.py", out, small_world, small_zoo[0], f"model.init_from={released}",
                  "model.init_connector=null", "data.feature_cache=null", "model.qlora=true", "training.max_steps=2",
                  "eval.limit=2")
    assert "qlora True" in stdout
    model, _, settings = load_llava(out)  # rebuilt on the checkpoint in 4 bits, as it trained
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert settings["qlora"] and quantized
    assert all(".language_model." in n for n in quantized)
    assert not any(".vision_tower." in n or ".multi_modal_projector." in n or "lm_head" in n for n in quantized)


def test_init_from_with_init_connector_is_refused_before_loading(stage1, released, small_world, small_zoo):
    cmd, env = _command("llava_finetune.py", released.parent / "refused", small_world, small_zoo[0],
                        f"model.init_from={released}", f"model.init_connector={stage1[0]}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    assert (f"model.init_from ({released}) brings the vision tower, connector and LM; unset model.init_connector"
            in proc.stderr)
    assert not (released.parent / "refused").exists()
