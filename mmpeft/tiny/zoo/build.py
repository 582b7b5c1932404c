"""Build the tiny model zoo from a world: tokenizers, CLIP, LM and Stable Diffusion.

Each part is trained, evaluated on the world's test split, saved with the libraries' own
`save_pretrained`, and marked finished by a `zoo_part.json` holding its spec and metrics,
written last. A second build with the same spec on the same world loads nothing and
trains nothing; a build whose spec differs only in one part's settings retrains that part
and what depends on it; a build on another world (its `world.json` differs) retrains all.

Parts run in two processes of one thread each: on a 2-core machine two single-threaded
trainings finish sooner than one two-threaded training after another.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmpeft.data.coco import read_coco

ZOO_VERSION = 2
PART_FILE = "zoo_part.json"


@dataclass(frozen=True)
class ZooSpec:
    """Training lengths and seed of the zoo; tests use tiny values, users the defaults."""

    seed: int = 0
    clip_steps: int = 500
    lm_steps: int = 2400
    lm_extra_chats: int = 20000  # chats about fresh scenes; answering from context needs many examples
    lm_chat_questions: int = 3  # questions per extra chat, at most
    lm_chat_loss: str = "answers"  # chats: learn only the answers ("answers") or every token ("all")
    vae_steps: int = 400
    unet_steps: int = 1200
    sd_single_objects: int = 8000  # one-object scenes drawn from the world's scene sampler
    sd_world_images: bool = False  # the world's 1-3 object training images too (halves colour and cell)
    sd_captions: str = "placed"  # UNet's captions: "placed" (the one naming each object's cell) or "all" five
    sd_image_size: int = 32
    sd_text_length: int = 32  # tokens the SD tokenizer pads prompts to; the world's captions take at most 31
    eval_questions: int = 300
    version: int = ZOO_VERSION


def _images(world: Path, split: str, size: int | None = None):
    coco = read_coco(world / "coco" / split, world / "coco/annotations" / f"captions_{split}.json",
                     world / "coco/annotations" / f"instances_{split}.json")
    pil = [Image.open(im.path).convert("RGB") for im in coco]
    if size:
        pil = [p.resize((size, size), Image.Resampling.BOX) for p in pil]
    return coco, pil


def _train_captions(world: Path) -> list[str]:
    """Every caption of the world's training images, image by image."""
    return [c for im in read_coco(world / "coco/train", world / "coco/annotations/captions_train.json")
            for c in im.captions]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def world_record(world: Path) -> dict:
    """The spec the world was built with (its `world.json`): what the zoo was trained on."""
    marker = world / "world.json"
    if not marker.exists():
        raise FileNotFoundError(f"{world} is not a built world: {marker} is missing (build it with `mmpeft world`)")
    return json.loads(marker.read_text())


def _same_world(recorded: dict | None, world: dict) -> bool:
    """Whether a part or tokenizer built on `recorded` fits `world`. Records written before
    the zoo noted its world hold none; they were all built on version-1 worlds."""
    return recorded == world if recorded is not None else world.get("version") == 1


def _finish(out: Path, spec: ZooSpec, world: Path, metrics: dict, seconds: float) -> dict:
    record = {"spec": asdict(spec), "world": world_record(world), "metrics": metrics, "seconds": round(seconds, 1)}
    (out / PART_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


# The spec fields each part's weights depend on; sd trains on clip's text encoder and the
# vae, so their fields are sd's too, and sd is rebuilt whenever either part is.
PART_FIELDS = {
    "clip": ("version", "seed", "clip_steps"),
    "lm": ("version", "seed", "lm_steps", "lm_extra_chats", "lm_chat_questions", "lm_chat_loss", "eval_questions"),
    "vae": ("version", "seed", "vae_steps", "sd_image_size"),
    "sd": ("version", "seed", "clip_steps", "vae_steps", "sd_image_size", "unet_steps", "sd_single_objects",
           "sd_world_images", "sd_captions", "sd_text_length", "eval_questions"),
}
PART_NEEDS = {"sd": ("clip", "vae")}
# What parts built before a field existed did; a field not listed here had its default.
BEFORE_FIELD = {"lm_chat_loss": "all", "sd_world_images": True, "sd_captions": "all", "sd_text_length": 77}
SD_CAPTIONS = ("placed", "all")


def _part_done(out: Path, spec: ZooSpec, world: dict) -> dict | None:
    """The part's record if it was built on `world` with the same values of the fields it
    depends on."""
    marker = out / PART_FILE
    if marker.exists():
        record = json.loads(marker.read_text())
        ours, before = asdict(spec), {**asdict(ZooSpec()), **BEFORE_FIELD}
        if _same_world(record.get("world"), world) and all(
                record["spec"].get(k, before[k]) == ours[k] for k in PART_FIELDS[out.name]):
            return record
    return None


def build_tokenizers(root: Path, world: Path, ours: dict) -> None:
    """LM and CLIP tokenizers, trained on the world's training text; `tokenizers/done`
    holds the world's spec, `ours` (an empty file: written before the zoo noted its world)."""
    from mmpeft.tiny.zoo.tokenizers import train_clip_tokenizer, train_lm_tokenizer

    done = root / "tokenizers" / "done"
    recorded = done.read_text().strip() if done.exists() else None
    if recorded is not None and _same_world(json.loads(recorded) if recorded else None, ours):
        return
    rows = _jsonl(world / "lm" / "train.jsonl")
    texts = [r["text"] for r in rows if "text" in r]
    texts += [f"{m['role']}\n{m['content']}" for r in rows if "messages" in r for m in r["messages"]]
    train_lm_tokenizer(texts).save_pretrained(root / "tokenizers" / "lm")
    train_clip_tokenizer(_train_captions(world)).save_pretrained(root / "tokenizers" / "clip")
    done.write_text(json.dumps(ours) + "\n")


def build_clip(root: Path, world: Path, spec: ZooSpec) -> dict:
    """Train, evaluate and save the tiny CLIP (`CLIPModel` + `CLIPProcessor`)."""
    from transformers import CLIPModel, CLIPTokenizer

    from mmpeft.tiny.zoo.clip import clip_recall, tiny_clip_config, tiny_clip_processor, train_clip

    start, out = time.time(), root / "clip"
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizers" / "clip")
    processor = tiny_clip_processor(tokenizer)
    train, train_pil = _images(world, "train")
    test, test_pil = _images(world, "test")
    torch.manual_seed(spec.seed)
    model = CLIPModel(tiny_clip_config(tokenizer))
    pixels = processor(images=train_pil, return_tensors="pt")["pixel_values"]
    losses = train_clip(model, tokenizer, pixels, [im.captions for im in train], spec.clip_steps, seed=spec.seed)
    metrics = clip_recall(model, tokenizer, processor(images=test_pil, return_tensors="pt")["pixel_values"],
                          [im.captions[0] for im in test])
    metrics["final_loss"] = float(np.mean(losses[-20:]))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return _finish(out, spec, world, metrics, time.time() - start)


def build_lm(root: Path, world: Path, spec: ZooSpec) -> dict:
    """Train, evaluate and save the tiny LLaMA-architecture LM with its tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mmpeft.tiny.world.build import scene_chats
    from mmpeft.tiny.zoo.lm import encode_corpus, text_qa_accuracy, tiny_lm_config, train_lm

    start, out = time.time(), root / "lm"
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizers" / "lm")
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(tiny_lm_config(tokenizer))
    train_rows = _jsonl(world / "lm" / "train.jsonl") + scene_chats(spec.lm_extra_chats, random.Random(spec.seed),
                                                                     spec.lm_chat_questions)
    test_rows = _jsonl(world / "lm" / "test.jsonl")
    losses = train_lm(model, encode_corpus(tokenizer, train_rows, spec.lm_chat_loss), tokenizer.pad_token_id,
                      spec.lm_steps, seed=spec.seed)
    metrics = text_qa_accuracy(model, tokenizer, [r for r in test_rows if "messages" in r][: spec.eval_questions])
    metrics.update(_perplexity(model, encode_corpus(tokenizer, test_rows[:500], spec.lm_chat_loss),
                               tokenizer.pad_token_id),
                   vocab_size=len(tokenizer))
    metrics["final_loss"] = float(np.mean(losses[-20:]))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return _finish(out, spec, world, metrics, time.time() - start)


@torch.no_grad()
def _perplexity(model, sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Perplexity on the tokens the LM learns: whole captions and stories, chats' answers."""
    from mmpeft.tiny.zoo.lm import batch_tensors

    total, count = 0.0, 0
    for pair in sequences:
        batch = batch_tensors([pair], pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total, count = total + model(**batch).loss.item() * n, count + n
    return {"test_perplexity": float(np.exp(total / count))}


def _pixels(pil: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(p) for p in pil])).permute(0, 3, 1, 2).float() / 127.5 - 1


def build_vae(root: Path, world: Path, spec: ZooSpec) -> dict:
    """Train and save the tiny `AutoencoderKL` (its own part so it can run beside CLIP)."""
    from mmpeft.tiny.zoo.diffusion import tiny_vae, train_vae

    start, out = time.time(), root / "vae"
    _, train_pil = _images(world, "train", spec.sd_image_size)
    _, test_pil = _images(world, "test", spec.sd_image_size)
    torch.manual_seed(spec.seed)
    vae = tiny_vae(spec.sd_image_size)
    train_vae(vae, _pixels(train_pil), spec.vae_steps, seed=spec.seed)
    with torch.no_grad():
        x = _pixels(test_pil)
        mse = torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()
    vae.save_pretrained(out)
    return _finish(out, spec, world, {"test_reconstruction_mse": mse, "pixel_variance": x.var().item()},
                   time.time() - start)


def build_sd(root: Path, world: Path, spec: ZooSpec) -> dict:
    """Train the UNet on the frozen VAE and CLIP text encoder, then save and score the
    whole `StableDiffusionPipeline` folder. By default it learns one-object scenes, each
    with the caption that names the object's cell: with the world's 1-3 object images or
    the four captions that leave cells out beside them, it learns colour and cell far less."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTokenizer

    from mmpeft.tiny.zoo.diffusion import make_pipeline, tiny_unet, train_unet

    start, out = time.time(), root / "sd"
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizers" / "clip")
    # the UNet attends to every padded position, so a shorter pad than CLIP's 77 trains it faster
    tokenizer.model_max_length = spec.sd_text_length
    text_encoder = CLIPModel.from_pretrained(root / "clip").text_model.eval()
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    train_pil, caption_sets = sd_training_set(world, spec)
    texts = [c for caps in caption_sets for c in caps] + [""]
    # MiniGPT-5 and GILL condition the UNet on the world's captions: they must fit too
    checked = texts + _train_captions(world)
    lengths = [len(ids) for ids in tokenizer(checked).input_ids]
    if max(lengths) > spec.sd_text_length:
        longest = checked[int(np.argmax(lengths))]
        raise ValueError(f"ZooSpec.sd_text_length={spec.sd_text_length} would cut the caption {longest!r} "
                         f"({max(lengths)} tokens)")
    with torch.no_grad():
        x = _pixels(train_pil)
        latents = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        latents = latents * vae.config.scaling_factor
        embeds = torch.cat([_encode_prompt(text_encoder, tokenizer, texts[i:i + 512])
                            for i in range(0, len(texts), 512)])
    index, k = [], 0
    for caps in caption_sets:
        index.append(list(range(k, k + len(caps))))
        k += len(caps)
    torch.manual_seed(spec.seed)
    unet, losses = train_unet(tiny_unet(text_encoder.config.hidden_size), latents, embeds[:-1], index,
                              embeds[-1], spec.unet_steps, seed=spec.seed)
    pipe = make_pipeline(vae, unet, text_encoder, tokenizer)
    pipe.save_pretrained(out)
    metrics = sd_attribute_accuracy(pipe, world, spec)
    metrics["final_loss"] = float(np.mean(losses[-50:]))
    return _finish(out, spec, world, metrics, time.time() - start)


def sd_training_set(world: Path, spec: ZooSpec) -> tuple[list[Image.Image], list[list[str]]]:
    """The UNet's images at `sd_image_size` and each one's captions: `sd_single_objects`
    fresh one-object scenes (where a caption's words map onto pixels plainly), after the
    world's training images when `sd_world_images`; every caption, or with
    `sd_captions="placed"` only the first, which names each object's cell."""
    from mmpeft.tiny.world.scene import captions, render, sample_scene

    if spec.sd_captions not in SD_CAPTIONS:
        raise ValueError(f"ZooSpec.sd_captions must be one of {SD_CAPTIONS}, got {spec.sd_captions!r}")
    train, pil = _images(world, "train", spec.sd_image_size) if spec.sd_world_images else ([], [])
    caption_sets = [im.captions for im in train]
    rng = random.Random(spec.seed)
    for _ in range(spec.sd_single_objects):
        scene = sample_scene(rng, 1)
        pil.append(render(scene, 64).resize((spec.sd_image_size,) * 2, Image.Resampling.BOX))
        caption_sets.append(captions(scene, rng))
    if spec.sd_captions == "placed":  # three of the five captions leave the cells out: noise to the UNet
        caption_sets = [caps[:1] for caps in caption_sets]
    return pil, caption_sets


def _encode_prompt(text_encoder, tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids).last_hidden_state


@torch.no_grad()
def sd_attribute_accuracy(pipe, world: Path, spec: ZooSpec, guidance_scales=(1.0, 3.0)) -> dict:
    """Generate one image per held-out single-object caption and read its colour, shape
    and cell from the pixels. The same pixel reader on the true images gives the ceiling."""
    from mmpeft.tiny.zoo.diffusion import pixel_attributes

    test, test_pil = _images(world, "test", spec.sd_image_size)
    cases = [(im, pil) for im, pil in zip(test, test_pil, strict=True) if len(im.objects) == 1]
    prompts = [im.captions[0] for im, _ in cases]
    truth = []
    for im, _ in cases:
        obj = im.objects[0]
        words = im.captions[0].rstrip(".").split(" at the ")[1]
        truth.append({"colour": obj["colour"], "shape": obj["category"], "where": words})

    def score(images) -> dict:
        read = [pixel_attributes(img) or {} for img in images]
        return {k: float(np.mean([r.get(k) == t[k] for r, t in zip(read, truth, strict=True)]))
                for k in ("colour", "shape", "where")}

    metrics = {"prompts": len(prompts), "chance": {"colour": 1 / 6, "shape": 1 / 3, "where": 1 / 9},
               "true_images": score([pil for _, pil in cases])}
    for g in guidance_scales:
        images = pipe(prompt=prompts, height=spec.sd_image_size, width=spec.sd_image_size, num_inference_steps=25,
                      guidance_scale=g, generator=torch.Generator().manual_seed(spec.seed)).images
        metrics[f"guidance_{g:g}"] = score(images)
    return metrics


_PARTS = {"clip": build_clip, "lm": build_lm, "vae": build_vae, "sd": build_sd}
# The pairs of parts that can train at the same time in `build_zoo`'s order: clip beside vae
# and then lm; lm (which starts when vae ends) beside sd (which starts when clip ends).
SIDE_BY_SIDE = (("clip", "vae"), ("clip", "lm"), ("lm", "sd"))


def part_threads(todo: list[str], workers: int, cores: int) -> int:
    """Threads per part: one each when two of the parts to train can run side by side,
    else every core, since they train one after another."""
    side_by_side = workers > 1 and any(set(pair) <= set(todo) for pair in SIDE_BY_SIDE)
    return 1 if side_by_side else max(1, cores)


def _run_part(name: str, root: str, world: str, spec: ZooSpec, threads: int) -> dict:
    torch.set_num_threads(threads)
    out = Path(root) / name
    shutil.rmtree(out, ignore_errors=True)
    record = _PARTS[name](Path(root), Path(world), spec)
    print(f"[zoo] {name} done in {record['seconds']} s: {json.dumps(record['metrics'])}", flush=True)
    return record


def build_zoo(root: str | os.PathLike, world: str | os.PathLike, spec: ZooSpec = ZooSpec(),
              workers: int = 2) -> dict[str, dict]:
    """Build whatever part of the zoo is missing or was built with another spec; return
    each part's record (spec, metrics, seconds)."""
    root, world = Path(root), Path(world)
    root.mkdir(parents=True, exist_ok=True)
    ours = world_record(world)
    build_tokenizers(root, world, ours)
    records = {name: _part_done(root / name, spec, ours) for name in _PARTS}
    todo = [name for name, rec in records.items()
            if rec is None or any(records[need] is None for need in PART_NEEDS.get(name, ()))]
    if not todo:
        return records
    threads = part_threads(todo, workers, torch.get_num_threads())
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        def submit(name):
            return pool.submit(_run_part, name, str(root), str(world), spec, threads) if name in todo else None

        # sd needs clip and vae; lm can take the worker that vae frees
        futures = {"clip": submit("clip"), "vae": submit("vae")}
        if futures["vae"]:
            records["vae"] = futures["vae"].result()
        futures["lm"] = submit("lm")
        if futures["clip"]:
            records["clip"] = futures["clip"].result()
        futures["sd"] = submit("sd")
        for name in ("lm", "sd"):
            if futures[name]:
                records[name] = futures[name].result()
    return records
