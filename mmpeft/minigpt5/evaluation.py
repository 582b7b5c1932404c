"""Held-out figures for voken models: does the LM emit vokens where an image belongs, does
the mapped conditioning carry the image (diffusion loss with the right versus shuffled
conditioning, same noise), and how close are generated images to the true ones under the
tiny CLIP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mmpeft.data.conversation import Sample
from mmpeft.data.stories import VokenDataset, VokenSample, collate_vokens, story_context
from mmpeft.eval.answers import _words, word_f1
from mmpeft.eval.clip_scores import clip_image_embeddings, clip_text_embeddings
from mmpeft.minigpt5.generation import interleaved_generate, prompt_tensors
from mmpeft.minigpt5.model import diffusion_target
from mmpeft.models.diffusion import generate_from_captions, generate_images
from mmpeft.train.placement import device_of, to_device


def _batches(model, dataset: VokenDataset, batch_size: int):
    pad = model.llava_model.config.text_config.pad_token_id or 0
    yield from DataLoader(dataset, batch_size=batch_size, collate_fn=collate_vokens(pad))


@torch.no_grad()
def mapped_conditions(model, dataset: VokenDataset, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced: the mapper's output for every voken run of the dataset and the
    run's target latents, `(conditions, latents)` in dataset order."""
    model.eval()
    conds, latents = [], []
    for batch in _batches(model, dataset, batch_size):
        batch = to_device(batch, device_of(model))
        target = batch.pop("target_latents")
        batch.pop("caption_embeds", None)
        states, _ = model.voken_states(batch)
        conds.append(model.mapper(states))
        latents.append(target)
    return torch.cat(conds), torch.cat(latents)


@torch.no_grad()
def conditioning_gap(model, conditions: torch.Tensor, latents: torch.Tensor, draws: int = 8,
                     seed: int = 0) -> dict[str, float]:
    """Mean diffusion loss (unweighted MSE against the scheduler's prediction target,
    `diffusion_target`: noise, velocity or latents) on held-out latents with their own
    conditioning, with another sample's (shifted by one), and with the unconditional
    embedding; the same noise and timesteps for all three. `gap` is the mean paired
    difference shuffled - right per sample and `gap_se` its standard error: a gap several
    standard errors above zero means the conditioning carries the image. The noise is drawn
    in float32 on the CPU (the same draws whatever the model's dtype and device), then
    moved to the latents' dtype and device; the MSE is taken in float32."""
    gen = torch.Generator().manual_seed(seed)
    uncond = model.mapper.unconditional(len(model.voken_ids)).expand_as(conditions)
    per_sample = {"right": 0.0, "shuffled": 0.0, "unconditional": 0.0}
    sched = model.noise_scheduler
    for _ in range(draws):
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen).to(latents.device)
        noisy = sched.add_noise(latents, noise, t)
        target = diffusion_target(sched, latents, noise, t).float()
        for name, cond in (("right", conditions), ("shuffled", conditions.roll(1, 0)), ("unconditional", uncond)):
            pred = model.unet(noisy, t, encoder_hidden_states=cond).sample.float()
            per_sample[name] = per_sample[name] + F.mse_loss(pred, target, reduction="none").mean((1, 2, 3)) / draws
    diff = per_sample["shuffled"] - per_sample["right"]
    se = diff.std().item() / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
    return {**{k: v.mean().item() for k, v in per_sample.items()}, "gap": diff.mean().item(), "gap_se": se}


@torch.no_grad()
def greedy_answers(model, encoder, samples: list[VokenSample], max_new_tokens: int = 48) -> list[tuple[str, bool]]:
    """For each sample, greedy generation from its prompt (the conversation without its
    answer): `(the text before [IMG0], whether [IMG0] came)`."""
    model.eval()
    answers = []
    for item in samples:
        prompt = Sample(item.sample.id, item.sample.messages[:-1], item.sample.images)
        ids, pixels = prompt_tensors(model, encoder, prompt)
        out = model.llava.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                   max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        first = model.voken_ids[0]
        text = encoder.tokenizer.decode(out[: out.index(first)] if first in out else out, skip_special_tokens=True)
        answers.append((text.strip(), first in out))
    return answers


def voken_emission(model, encoder, samples: list[VokenSample], max_new_tokens: int = 48) -> float:
    """Fraction of samples for which greedy generation from the prompt emits `[IMG0]`."""
    return sum(emitted for _, emitted in greedy_answers(model, encoder, samples, max_new_tokens)) / max(1, len(samples))


SENTENCE_WORDS = 4  # fewer words before the image ("the top right.") do not tell the step


def told_figures(texts: list[str], truths: list[str]) -> dict[str, float]:
    """"Tell it and show it": the share of answers with a sentence (`SENTENCE_WORDS` words
    or more) before the image, and the mean word F1 of that text against the step's true
    sentence, next to the same against another story's (shifted by one): the control."""
    n = max(1, len(texts))
    return {"told_share": sum(len(_words(t)) >= SENTENCE_WORDS for t in texts) / n,
            "told_word_f1": sum(word_f1(t, r) for t, r in zip(texts, truths, strict=True)) / n,
            "told_word_f1_shuffled": sum(word_f1(t, r) for t, r in zip(texts, truths[1:] + truths[:1],
                                                                          strict=True)) / n}


def story_figures(model, pipeline, encoder, items: dict[str, list[VokenSample]], clip, clip_processor,
                  guidance: float, steps: int = 25) -> tuple[dict, list]:
    """The held-out figures on the last step of each story (`items` from `story_samples`
    with `last_step_only`, by task): voken emission where an image belongs (multimodal
    task) and where none does (image -> text task); diffusion loss with right, shuffled
    and unconditional conditioning; CLIP image-image similarity of generated to true last
    images, next to shuffled pairs and to SD given the true caption; CLIP text-image
    similarity with guidance on and off. Also returns the generated images."""
    from mmpeft.data.conversation import open_image
    from mmpeft.data.diffusion_targets import LatentTargets, sd_resolution

    told = greedy_answers(model, encoder, items["multimodal"])
    figures = {"stories": len(items["image"]),
               "voken_emission_where_image": sum(emitted for _, emitted in told) / max(1, len(told)),
               "voken_emission_where_text": voken_emission(model, encoder, items["text"]),
               **told_figures([text for text, _ in told], [s.captions[0] for s in items["multimodal"]])}
    test = VokenDataset(items["image"], encoder, model.voken_ids, LatentTargets(pipeline.vae, sd_resolution(pipeline)))
    conds, latents = mapped_conditions(model, test)
    figures.update({f"diffusion_loss_{k}": v for k, v in conditioning_gap(model, conds, latents).items()})
    uncond = model.mapper.unconditional(len(model.voken_ids))
    guided = generate_images(pipeline, conds, uncond, guidance, steps)
    unguided = generate_images(pipeline, conds, None, 1.0, steps)
    captions = [s.captions[0] for s in test.items]
    baseline = generate_from_captions(pipeline, captions, guidance, steps)
    truth = clip_image_embeddings(clip, clip_processor, [open_image(s.targets[0], s.sample.id) for s in test.items])
    text = clip_text_embeddings(clip, clip_processor, captions)
    gen, plain, base = (clip_image_embeddings(clip, clip_processor, ims) for ims in (guided, unguided, baseline))
    figures.update({
        "clip_image_similarity": (gen * truth).sum(-1).mean().item(),
        "clip_image_similarity_shuffled": (gen * truth.roll(1, 0)).sum(-1).mean().item(),
        "clip_image_similarity_sd_caption": (base * truth).sum(-1).mean().item(),
        "clip_text_similarity_guided": (gen * text).sum(-1).mean().item(),
        "clip_text_similarity_unguided": (plain * text).sum(-1).mean().item(),
    })
    return figures, list(zip(test.items, guided, baseline, strict=True))


def story_page_rows(model, pipeline, encoder, stories: dict, items: dict[str, list[VokenSample]], generated: list,
                    history: int | None, guidance: float, steps: int = 25, limit: int = 8) -> list[dict]:
    """Rows for `write_story_page`: for the first `limit` held-out stories, the context
    steps, the model's free interleaved answer to "what happens next", the true last
    step, and SD's image for the true caption."""
    rows = []
    for (item, _, baseline), asked in zip(generated[:limit], items["multimodal"], strict=False):
        story = item.sample.id.rsplit("/", 2)[0]
        prompt = Sample(asked.sample.id, asked.sample.messages[:-1], asked.sample.images)
        text, image = interleaved_generate(model, pipeline, encoder, prompt, guidance, steps=steps)
        shown = story_context(stories[story], len(stories[story]) - 1, history)
        rows.append({"id": story, "context": [(s.text, s.image) for s in shown],
                     "prompt": prompt.messages[-1]["content"], "text": text, "image": image,
                     "truth_text": item.captions[0], "truth_image": item.targets[0], "baseline_image": baseline})
    return rows


def describe_story_figures(fig: dict) -> str:
    """One paragraph with the figures of `story_figures`."""
    return (f"held-out stories ({fig['stories']}): vokens emitted where an image belongs "
            f"{fig['voken_emission_where_image']:.2f}, where none does {fig['voken_emission_where_text']:.2f}; "
            f"a sentence before the image in {fig['told_share']:.2f} of answers, word F1 {fig['told_word_f1']:.3f} "
            f"against the true one ({fig['told_word_f1_shuffled']:.3f} against another story's); "
            f"diffusion loss with the right conditioning {fig['diffusion_loss_right']:.4f}, shuffled "
            f"{fig['diffusion_loss_shuffled']:.4f} (paired gap {fig['diffusion_loss_gap']:.4f} +- "
            f"{fig['diffusion_loss_gap_se']:.4f}), unconditional {fig['diffusion_loss_unconditional']:.4f}; "
            f"CLIP similarity of generated to true last image {fig['clip_image_similarity']:.3f} (shuffled pairs "
            f"{fig['clip_image_similarity_shuffled']:.3f}, SD given the true caption "
            f"{fig['clip_image_similarity_sd_caption']:.3f}); CLIP text-image similarity with guidance "
            f"{fig['clip_text_similarity_guided']:.3f}, without {fig['clip_text_similarity_unguided']:.3f}")
