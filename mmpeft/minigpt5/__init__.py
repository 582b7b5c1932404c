"""MiniGPT-5: a LLaVA-style LM that emits generative vokens, mapped by `VokenMapper` into
Stable Diffusion's text-condition space and trained with the latent diffusion loss."""

from __future__ import annotations

from mmpeft.families import CardMetric, Family, Loaded


def _load(folder, lm=None, clip=None, diffusion=None, base_kwargs=None) -> Loaded:
    from mmpeft.minigpt5.checkpoint import load_minigpt5

    model, processor, pipeline, settings = load_minigpt5(folder, lm, clip, diffusion, base_kwargs=base_kwargs)
    return Loaded(model, processor, settings, pipeline, folder=folder)


def _export(folder, out, lm=None, clip=None) -> dict:
    """The LM part as LLaVA's native folder (voken rows merged into the vocabulary), plus
    the mapper's weights."""
    import shutil
    from pathlib import Path

    from mmpeft.llava.export import export_llava

    settings = export_llava(folder, out, lm, clip)
    shutil.copy(Path(folder) / "mapper.safetensors", Path(out) / "mapper.safetensors")
    return settings


def _stage1_rows(name: str, m: dict) -> list:
    return [(name, "training loss, first -> last step", m["loss"], f"first {m['first_loss']:.3f}"),
            (name, "held-out diffusion loss, mapped voken conditioning", m["heldout_diffusion_loss_right"],
             f"shuffled {m['heldout_diffusion_loss_shuffled']:.4f}, gap {m['heldout_diffusion_loss_gap']:.4f} +- "
             f"{m['heldout_diffusion_loss_gap_se']:.4f}")]


def _stage2_rows(name: str, m: dict) -> list:
    return [(name, "training loss, first -> last step", m["loss"], f"first {m['first_loss']:.3f}"),
            (name, f"vokens emitted where an image belongs ({m['stories']} stories)", m["voken_emission_where_image"],
             f"where none belongs {m['voken_emission_where_text']:.2f}"),
            (name, "told it: answers with a sentence before the image", m["told_share"],
             f"its word F1 {m['told_word_f1']:.3f}, against another story's {m['told_word_f1_shuffled']:.3f}"),
            (name, "held-out diffusion loss, mapped voken conditioning", m["diffusion_loss_right"],
             f"shuffled {m['diffusion_loss_shuffled']:.4f}, gap {m['diffusion_loss_gap']:.4f} +- "
             f"{m['diffusion_loss_gap_se']:.4f}"),
            (name, "CLIP similarity, generated vs true last image", m["clip_image_similarity"],
             f"shuffled pairs {m['clip_image_similarity_shuffled']:.3f}, SD given the true caption "
             f"{m['clip_image_similarity_sd_caption']:.3f}"),
            (name, "CLIP text-image similarity with guidance", m["clip_text_similarity_guided"],
             f"without guidance {m['clip_text_similarity_unguided']:.3f}")]


def _plan_parts(*args):
    from mmpeft.minigpt5.plan import plan_parts

    return plan_parts(*args)


FAMILY = Family(
    name="minigpt5",
    recipes=("minigpt5_stage1", "minigpt5_stage2"),
    description="a MiniGPT-5 model: a LLaVA-style LM that emits generative vokens, mapped into Stable "
                "Diffusion's text-condition space",
    pipeline_tag="any-to-any",
    load=_load,
    export=_export,
    card_metrics={
        "minigpt5_stage1": (CardMetric("heldout_diffusion_loss_right", "loss", "text-to-image",
                                       "held-out latent diffusion loss with the mapped voken conditioning"),),
        "minigpt5_stage2": (CardMetric("voken_emission_where_image", "accuracy", "any-to-any",
                                       "vokens emitted where the story's next image belongs"),
                            CardMetric("clip_image_similarity", "cosine_similarity", "text-to-image",
                                       "CLIP similarity of generated and true last story images")),
    },
    figures={"minigpt5_stage1": _stage1_rows, "minigpt5_stage2": _stage2_rows},
    plan_parts=_plan_parts,
)
