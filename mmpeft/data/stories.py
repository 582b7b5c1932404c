"""Voken training data: caption pairs (stage 1) and VIST-format stories (stage 2) turned into
conversations whose answers hold the voken run where an image belongs, each run paired
with its target image (and caption).

Stage-2 tasks from story step k, with the earlier steps (their sentence and image) as
context, all of them as in MiniGPT-5 or the last `history` of them:

    image        the user gives step k's sentence; the answer is the vokens (every step)
    multimodal   the user asks what happens next; the answer is step k's sentence, then the
                 vokens (no space between: a lone space token is one more thing to predict)
    text         the user shows step k's image; the answer is its sentence

As in MiniGPT-5's VIST data, "what happens next" and the text task start at the second step
(k >= 1): at the first there is no story yet to go on from. The instruction wording of each
task is a recipe setting (`data.prompts`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmpeft.data.conversation import IMAGE_MARKER, BadRecord, Sample
from mmpeft.data.dataset import ConversationDataset, collate_conversations
from mmpeft.data.prepared import check_image, compact, expand
from mmpeft.models.vokens import mask_forced_vokens

TASKS = ("image", "multimodal", "text")
FIRST_STEP = {"image": 0, "multimodal": 1, "text": 1}  # the first story step each task is built at


@dataclass
class StoryStep:
    text: str
    image: Path


@dataclass
class VokenSample:
    """A conversation plus, for each voken run in it (in order), the target image and the
    caption that describes it."""

    sample: Sample
    targets: list
    captions: list[str]


def read_vist(path: str | Path, image_folder: str | Path, steps: int = 5,
              skipped: Counter | None = None) -> dict[str, list[StoryStep]]:
    """VIST story-in-sequence JSON: story id -> its steps in `worker_arranged_photo_order`,
    images `image_folder/<photo_flickr_id>.<jpg|png|jpeg|gif>`. A story without exactly
    `steps` steps, or with a missing or malformed field, is an error naming the file and the
    story; given a `skipped` counter, it is left out and counted there by reason instead."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read VIST stories: {err}") from err
    if "annotations" not in data:
        raise ValueError(f"{path}: no 'annotations' list (VIST story-in-sequence format)")

    def bad(message: str, kind: str) -> None:
        if skipped is None:
            raise ValueError(f"{path}: {message}")
        skipped[kind] += 1

    stories: dict[str, list] = {}
    for k, entry in enumerate(data["annotations"]):
        ann = entry[0] if isinstance(entry, list) and entry else entry
        missing = [f for f in ("story_id", "photo_flickr_id", "worker_arranged_photo_order", "text")
                   if not isinstance(ann, dict) or f not in ann]
        if missing:
            bad(f"annotation #{k} lacks {', '.join(missing)}", "malformed annotation")
            if isinstance(ann, dict) and "story_id" in ann:
                stories.setdefault(str(ann["story_id"]), []).append(None)  # the story is incomplete
            continue
        stories.setdefault(str(ann["story_id"]), []).append(ann)
    out = {}
    for sid, anns in stories.items():
        if None in anns:
            continue  # counted with its annotation
        if len(anns) != steps:
            bad(f"story {sid} has {len(anns)} steps, expected {steps}", "wrong step count")
            continue
        try:
            anns.sort(key=lambda a: int(a["worker_arranged_photo_order"]))
        except (TypeError, ValueError) as err:
            bad(f"story {sid}: a worker_arranged_photo_order is not a whole number ({err})", "malformed annotation")
            continue
        out[sid] = [StoryStep(a.get("original_text") or a["text"], _photo(Path(image_folder), a["photo_flickr_id"]))
                    for a in anns]
    return out


def _photo(folder: Path, photo_id) -> Path:
    """VIST names images by Flickr id with the original extension (mostly .jpg)."""
    for ext in ("jpg", "png", "jpeg", "gif"):
        if (folder / f"{photo_id}.{ext}").exists():
            return folder / f"{photo_id}.{ext}"
    return folder / f"{photo_id}.jpg"  # missing: the dataset's image check names it


def voken_text(n: int = 8) -> str:
    return "".join(f"[IMG{i}]" for i in range(n))


def caption_voken_sample(sample_id: str, image, caption: str, prompt: str, n_vokens: int = 8) -> VokenSample:
    """Stage 1: the user asks for a picture of the caption, the answer is the vokens."""
    messages = [{"role": "user", "content": prompt.format(caption=caption.strip())},
                {"role": "assistant", "content": voken_text(n_vokens)}]
    return VokenSample(Sample(sample_id, messages), [image], [caption.strip()])


def story_context(steps: list[StoryStep], k: int, history: int | None = None) -> list[StoryStep]:
    """The steps shown before step `k`: all earlier ones (`history` None, as MiniGPT-5), or
    the last `history` of them."""
    if history is not None and history < 0:
        raise ValueError(f"data.history is {history}: null (all earlier steps) or a count >= 0")
    return steps[:k] if history is None else steps[max(0, k - history):k]


def story_samples(story_id: str, steps: list[StoryStep], prompts: dict[str, str], tasks=TASKS,
                  history: int | None = None, n_vokens: int = 8, last_step_only: bool = False) -> list[VokenSample]:
    """The stage-2 samples of one story: for each step (or only the last) and each task from
    its first step on (`FIRST_STEP`), the steps before it as `story_context` chooses."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown stage-2 task(s) {unknown}; tasks are {', '.join(TASKS)}")
    out = []
    for k in range(len(steps) - 1 if last_step_only else 0, len(steps)):
        context = story_context(steps, k, history)
        lead = "".join(f"{s.text} {IMAGE_MARKER}\n" for s in context)
        images = [s.image for s in context]
        step = steps[k]
        for task in tasks:
            if k < FIRST_STEP[task]:
                continue
            sid = f"{story_id}/{k}/{task}"
            if task == "image":
                user, answer, targets = lead + prompts["image"].format(text=step.text), voken_text(n_vokens), [step]
            elif task == "multimodal":
                user, answer, targets = lead + prompts["multimodal"], step.text + voken_text(n_vokens), [step]
            else:
                user, answer, targets = lead + f"{IMAGE_MARKER}\n" + prompts["text"], step.text, []
            extra = [step.image] if task == "text" else []
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            out.append(VokenSample(Sample(sid, messages, images + extra), [t.image for t in targets],
                                   [t.text for t in targets]))
    return out


@dataclass
class SampleShape:
    """The shortest sequence a kind of sample needs: its images' token runs, its vokens and
    the tokens of the chat template and the instruction, before any caption or sentence."""

    task: str
    images: int
    image_tokens: int
    vokens: int
    template: int

    @property
    def tokens(self) -> int:
        return self.images * self.image_tokens + self.vokens + self.template

    def describe(self) -> str:
        return (f"{self.task} task with {self.images} image(s): {self.images} x {self.image_tokens} image tokens + "
                f"{self.vokens} vokens + {self.template} template and instruction tokens = {self.tokens}")


def sample_shape(encoder, voken_ids: list[int], sample: VokenSample, task: str) -> SampleShape:
    """Count the tokens of `sample` as the encoder writes and tokenizes it (its conversation
    format), each `<image>` as the encoder's `image_seq_length` tokens; nothing is checked."""
    ids = encoder.token_ids(sample.sample)
    images = ids.count(encoder.image_token_id)
    vokens = sum(ids.count(v) for v in voken_ids)
    return SampleShape(task, images, encoder.image_seq_length, vokens, len(ids) - images - vokens)


def _shown(history: int | None, story_steps: int) -> int:
    """How many earlier steps the last step of a story shows."""
    return story_steps - 1 if history is None else min(history, story_steps - 1)


def story_shapes(encoder, voken_ids: list[int], prompts: dict[str, str], tasks, history: int | None,
                 story_steps: int = 5) -> list[SampleShape]:
    """The largest sample of each stage-2 task, with every sentence empty: the last step of
    a story with the earlier steps `history` shows (None: all `story_steps - 1`)."""
    steps = [StoryStep("", Path(f"step{k}")) for k in range(story_steps)]
    samples = story_samples("shape", steps, prompts, tasks, history, len(voken_ids), last_step_only=True)
    return [sample_shape(encoder, voken_ids, s, s.sample.id.rsplit("/", 1)[1]) for s in samples]


def check_story_fit(encoder, voken_ids: list[int], prompts: dict[str, str], tasks, history: int | None,
                    story_steps: int = 5) -> list[SampleShape]:
    """Stop before any data is read when `encoder.max_length` cannot hold the largest stage-2
    sample the settings ask for even with empty sentences; such samples would otherwise all
    be cut or skipped. The error gives the numbers, names the recipe's `data.max_length` and
    `data.history`, and the largest history that fits. Returns the shapes when all fit."""
    shapes = story_shapes(encoder, voken_ids, prompts, tasks, history, story_steps)
    limit = encoder.max_length
    too_long = sorted((s for s in shapes if s.tokens > limit), key=lambda s: -s.tokens)
    if not too_long:
        return shapes
    advice = f"raise data.max_length to at least {too_long[0].tokens} (the sentences come on top)"
    for lower in range(_shown(history, story_steps) - 1, -1, -1):
        largest = max(story_shapes(encoder, voken_ids, prompts, tasks, lower, story_steps), key=lambda s: s.tokens)
        if largest.tokens <= limit:
            advice += f" or lower data.history to {lower} (largest sample then: {largest.describe()})"
            break
    shown = "null (all earlier steps)" if history is None else history
    raise ValueError(f"data.max_length {limit} cannot hold a stage-2 sample with data.history {shown}: "
                     + "; ".join(s.describe() for s in too_long) + f"; {advice}")


def check_caption_fit(encoder, voken_ids: list[int], prompt: str) -> SampleShape:
    """Stage 1's counterpart of `check_story_fit`: the caption prompt and the vokens, with an
    empty caption, must fit `encoder.max_length`."""
    shape = sample_shape(encoder, voken_ids, caption_voken_sample("shape", b"", "", prompt, len(voken_ids)),
                         "caption")
    if shape.tokens > encoder.max_length:
        raise ValueError(f"data.max_length {encoder.max_length} cannot hold a stage-1 sample: {shape.describe()}; "
                         f"raise data.max_length to at least {shape.tokens} (the caption comes on top)")
    return shape


class VokenDataset(Dataset):
    """Encoded conversations (see `ConversationDataset`: checked up front, bad records an
    error or a counted skip) with each voken run's target latents and, when
    `captions` is given, its caption encoding. `latents(images)` and `captions(texts)`
    return stacked tensors, read from a cache or computed."""

    def __init__(self, samples: list[VokenSample], encoder, voken_ids: list[int], latents, captions=None,
                 skip_bad_records: bool = False, features=None):
        by_id = {}
        for s in samples:
            if s.sample.id in by_id:
                raise ValueError(f"two samples share the id {s.sample.id}")
            by_id[s.sample.id] = s
        self.conversations = ConversationDataset([s.sample for s in samples], encoder, skip_bad_records,
                                                 features=features)
        self.latents, self.captions, self.voken_ids = latents, captions, voken_ids
        self.items, kept, seen = [], [], {}
        image_run = (encoder.image_token_id, encoder.image_seq_length)
        for (sample, small), digests in zip(self.conversations.items, self.conversations.digests, strict=True):
            encoded = expand(small[0], small[1], *image_run)
            encoded["labels"] = mask_forced_vokens(encoded["input_ids"], encoded["labels"], voken_ids)
            runs = encoded["input_ids"].count(voken_ids[0])
            complete = encoded["input_ids"].count(voken_ids[-1])
            target_problem = next((why for im in by_id[sample.id].targets if (why := check_image(im, seen)[1])), None)
            err = None
            if runs != complete or runs != len(by_id[sample.id].targets):
                err = BadRecord(sample.id, f"{runs} voken run(s) ({complete} complete) within max_length but "
                                f"{len(by_id[sample.id].targets)} target image(s)", "vokens cut or unmatched")
            elif target_problem:
                err = BadRecord(sample.id, f"target {target_problem}", "bad target image")
            if err:
                if not skip_bad_records:
                    raise err
                self.conversations.skipped[err.kind] += 1
                self.conversations.skipped_ids.append(sample.id)
                continue
            self.items.append(by_id[sample.id])
            kept.append(((sample, compact(encoded, *image_run)), digests))
        self.conversations.items = [item for item, _ in kept]
        self.conversations.digests = [digests for _, digests in kept]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        row = self.conversations[i]
        item = self.items[i]
        if item.targets:
            row["target_latents"] = self.latents(item.targets)
            if self.captions is not None:
                row["caption_embeds"] = self.captions(item.captions)
        return row

    @property
    def lengths(self) -> list[int]:
        return self.conversations.lengths

    @property
    def has_image(self) -> list[bool]:
        return self.conversations.has_image

    @property
    def skipped(self):
        return self.conversations.skipped

    def skip_report(self) -> str:
        return self.conversations.skip_report()


def collate_vokens(pad_id: int):
    """`collate_conversations` plus the target latents and caption encodings, stacked in
    sample order (which is the row-major order of the voken runs)."""
    base = collate_conversations(pad_id)

    def collate(rows: list[dict]) -> dict:
        batch = base(rows)
        for key in ("target_latents", "caption_embeds"):
            parts = [r[key] for r in rows if key in r]
            if parts:
                batch[key] = torch.cat(parts)
        return batch

    return collate
