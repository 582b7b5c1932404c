"""Held-out figures for GILL: text-to-image retrieval from the `[IMG]` tokens against the
tiny CLIP's own text encoder, generated-image similarity against shuffled pairs, the
retrieve-or-generate decision against the majority class, and a miniature of the paper's
story evaluation (the last image of a five-step story from its captions, with and without
the earlier images).
"""

from __future__ import annotations

import torch

from mmpeft.data.conversation import IMAGE_MARKER, Sample, open_image
from mmpeft.data.stories import voken_text
from mmpeft.eval.clip_scores import clip_image_embeddings, encode_images, encode_texts
from mmpeft.eval.retrieval import recall
from mmpeft.models.diffusion import generate_images
from mmpeft.train.placement import device_of


@torch.no_grad()
def image_pass_outputs(model, encoder, samples: list[Sample], clip, batch_size: int = 32):
    """`(states at [IMG0] (n, hidden), mapped conditions (n, n_query, width))` for
    conversations that end with the `[IMG]` run; their images are read as input tokens."""
    model.eval()
    at0, mapped = [], []
    for b in range(0, len(samples), batch_size):
        chunk = samples[b:b + batch_size]
        rows = [encoder.encode_text(s)["input_ids"] for s in chunk]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), encoder.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, r in enumerate(rows):
            ids[k, :len(r)], mask[k, :len(r)] = torch.tensor(r), 1
        images = [im for s in chunk for im in s.images]
        device = device_of(model)
        _, a, m_in = model.image_pass(ids.to(device), mask.to(device),
                                      clip_embeds=clip(images).to(device) if images else None)
        at0.append(a)
        mapped.append(model.mapper(m_in))
    return torch.cat(at0), torch.cat(mapped)


def query(caption: str, prompt: str, n_vokens: int, context: list[tuple[str, object]] = ()) -> Sample:
    """The image-pass conversation for a caption, after optional context steps (text and
    image, or text alone when the image is None)."""
    lead = "".join(f"{t} {IMAGE_MARKER}\n" if im is not None else f"{t}\n" for t, im in context)
    images = [im for _, im in context if im is not None]
    return Sample("query", [{"role": "user", "content": lead + prompt.format(caption=caption)},
                            {"role": "assistant", "content": voken_text(n_vokens)}], images)


def retrieval_figures(model, encoder, pairs, clip, clip_model, clip_processor,
                      prompt: str) -> tuple[dict, torch.Tensor]:
    """Recall@1/@5 of each pair's image among all the pairs' images, from the `[IMG0]` state
    and from the tiny CLIP's text encoder; returns the figures and the `[IMG0]` states."""
    images = [p.images[0] for p in pairs]
    captions = [p.messages[-1]["content"] for p in pairs]
    at0, _ = image_pass_outputs(model, encoder, [query(c, prompt, len(model.voken_ids)) for c in captions], clip)
    index = model.retrieval.embed_image(clip(images).to(at0.device))
    truth = torch.arange(len(pairs))
    ours = recall(model.retrieval.embed_text(at0) @ index.T, truth)
    pixels = clip_processor(images=[open_image(im, str(im)) for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        texts = encode_texts(clip_model, clip_processor.tokenizer, captions)
        base = recall(texts @ encode_images(clip_model, pixels).T, truth)
    n = len(pairs)
    return {"images": n, "recall_at_1": ours[1], "recall_at_5": ours[5], "clip_text_recall_at_1": base[1],
            "clip_text_recall_at_5": base[5], "chance_at_1": 1 / n, "chance_at_5": min(1.0, 5 / n)}, at0


def generation_figures(model, pipeline, encoder, pairs, clip, clip_model, clip_processor, prompt: str,
                       negative: torch.Tensor, guidance: float, steps: int) -> tuple[dict, list]:
    """CLIP similarity of images generated from the mapped `[IMG]` states to the true
    images, next to shuffled pairs."""
    captions = [p.messages[-1]["content"] for p in pairs]
    _, mapped = image_pass_outputs(model, encoder, [query(c, prompt, len(model.voken_ids)) for c in captions], clip)
    images = generate_images(pipeline, mapped, negative[None], guidance, steps)
    gen = clip_image_embeddings(clip_model, clip_processor, images)
    truth = clip_image_embeddings(clip_model, clip_processor, [open_image(p.images[0], p.id) for p in pairs])
    return {"generated": len(pairs), "clip_image_similarity": (gen * truth).sum(-1).mean().item(),
            "clip_image_similarity_shuffled": (gen * truth.roll(1, 0)).sum(-1).mean().item()}, images


def story_figures(model, pipeline, encoder, stories: dict, clip, clip_model, clip_processor, prompt: str,
                  negative: torch.Tensor, guidance: float, steps: int) -> dict:
    """The last image of each five-step story from the five captions alone, and from the
    captions with the first four images: recall@1 among the stories' last images and CLIP
    similarity of the generated image to the true one."""
    lasts = [s[-1].image for s in stories.values()]
    index = model.retrieval.embed_image(clip(lasts).to(device_of(model)))
    truth_clip = clip_image_embeddings(clip_model, clip_processor, [open_image(im, str(im)) for im in lasts])
    out = {"stories": len(stories)}
    for name, with_images in (("captions", False), ("captions_images", True)):
        qs = [query(s[-1].text, prompt, len(model.voken_ids),
                    [(st.text, st.image if with_images else None) for st in s[:-1]]) for s in stories.values()]
        at0, mapped = image_pass_outputs(model, encoder, qs, clip)
        out[f"{name}_recall_at_1"] = recall(model.retrieval.embed_text(at0) @ index.T,
                                            torch.arange(len(lasts)), ks=(1,))[1]
        gen = clip_image_embeddings(clip_model, clip_processor,
                                    generate_images(pipeline, mapped, negative[None], guidance, steps))
        out[f"{name}_clip_image_similarity"] = (gen * truth_clip).sum(-1).mean().item()
    return out


def describe(m: dict) -> str:
    """One paragraph with the held-out figures a GILL run writes to metrics.json."""
    return (f"held-out text-to-image retrieval over {m['images']} images: recall@1 {m['recall_at_1']:.3f}, @5 "
            f"{m['recall_at_5']:.3f} from the [IMG] tokens; tiny CLIP's text encoder {m['clip_text_recall_at_1']:.3f}, "
            f"{m['clip_text_recall_at_5']:.3f}; chance {m['chance_at_1']:.3f}, {m['chance_at_5']:.3f}. Generated vs "
            f"true image CLIP similarity {m['clip_image_similarity']:.3f} (shuffled pairs "
            f"{m['clip_image_similarity_shuffled']:.3f}). Decision accuracy {m['decision_accuracy']:.3f} (majority "
            f"class {m['decision_majority']:.3f}). Stories ({m['story_stories']}): last image from captions "
            f"recall@1 {m['story_captions_recall_at_1']:.3f}, similarity "
            f"{m['story_captions_clip_image_similarity']:.3f}; from captions and images "
            f"{m['story_captions_images_recall_at_1']:.3f}, "
            f"{m['story_captions_images_clip_image_similarity']:.3f}")
