"""GILL: `[IMG]` tokens on a frozen causal LM with a retrieval head, a generation mapper
into Stable Diffusion's text-condition space and a retrieve-or-generate decision head."""

from __future__ import annotations

from mmpeft.families import CardMetric, Family, Loaded


def _load(folder, lm=None, clip=None, diffusion=None, base_kwargs=None) -> Loaded:
    from mmpeft.gill.checkpoint import load_gill

    model, tokenizer, settings = load_gill(folder, lm, base_kwargs=base_kwargs)
    return Loaded(model, tokenizer, settings, folder=folder)


def _export(folder, out, lm=None, clip=None) -> dict:
    """The merged LM as a plain causal-LM folder (the `[IMG]` rows merged), the tokenizer
    and the heads' weights."""
    from mmpeft.export import export_merged_lm

    return export_merged_lm(folder, out, lm, "gill_heads.safetensors")


def _rows(name: str, m: dict) -> list:
    return [(name, "training loss, first -> last step", m["loss"], f"first {m['first_loss']:.3f}"),
            (name, f"text-to-image recall@1 from [IMG] tokens ({m['images']} images)", m["recall_at_1"],
             f"tiny CLIP text encoder {m['clip_text_recall_at_1']:.3f}, chance {m['chance_at_1']:.3f}"),
            (name, "text-to-image recall@5 from [IMG] tokens", m["recall_at_5"],
             f"tiny CLIP text encoder {m['clip_text_recall_at_5']:.3f}, chance {m['chance_at_5']:.3f}"),
            (name, f"CLIP similarity, generated vs true image ({m['generated']} captions)", m["clip_image_similarity"],
             f"shuffled pairs {m['clip_image_similarity_shuffled']:.3f}"),
            (name, "retrieve-or-generate decision accuracy", m["decision_accuracy"],
             f"majority class {m['decision_majority']:.3f}"),
            (name, f"story last image, CLIP similarity from captions + images ({m['story_stories']})",
             m["story_captions_images_clip_image_similarity"],
             f"captions only {m['story_captions_clip_image_similarity']:.3f}"),
            (name, "story last image, recall@1 from captions + images", m["story_captions_images_recall_at_1"],
             f"captions only {m['story_captions_recall_at_1']:.3f}, chance {1 / m['story_stories']:.3f}")]


def _plan_parts(*args):
    from mmpeft.gill.plan import plan_parts

    return plan_parts(*args)


FAMILY = Family(
    name="gill",
    recipes=("gill",),
    description="a GILL model: [IMG] tokens on a causal LM with a retrieval head, a generation mapper into "
                "Stable Diffusion's text-condition space and a retrieve-or-generate decision head",
    pipeline_tag="any-to-any",
    load=_load,
    export=_export,
    card_metrics={"gill": (
        CardMetric("recall_at_1", "recall", "text-to-image", "text-to-image recall@1 from the [IMG] tokens"),
        CardMetric("recall_at_5", "recall", "text-to-image", "text-to-image recall@5 from the [IMG] tokens"),
        CardMetric("clip_image_similarity", "cosine_similarity", "text-to-image",
                   "CLIP similarity of generated and true images"),
        CardMetric("decision_accuracy", "accuracy", "text-classification", "retrieve-or-generate decision accuracy"),
    )},
    figures={"gill": _rows},
    plan_parts=_plan_parts,
)
