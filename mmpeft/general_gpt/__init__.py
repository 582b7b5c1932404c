"""General-GPT: a causal LM that takes precomputed vectors in at `<emb>` and regresses them
at `[CLIP OUT]`."""

from __future__ import annotations

from mmpeft.families import CardMetric, Family, Loaded


def _load(folder, lm=None, clip=None, diffusion=None, base_kwargs=None) -> Loaded:
    from mmpeft.general_gpt.checkpoint import load_general_gpt

    model, tokenizer, settings = load_general_gpt(folder, lm, base_kwargs=base_kwargs)
    return Loaded(model, tokenizer, settings, folder=folder)


def _export(folder, out, lm=None, clip=None) -> dict:
    """The merged LM as a plain causal-LM folder, the tokenizer and the heads' weights."""
    from mmpeft.export import export_merged_lm

    return export_merged_lm(folder, out, lm, "general_gpt.safetensors")


FAMILY = Family(
    name="general_gpt",
    recipes=("general_gpt",),
    description="a General-GPT model: a causal LM that takes precomputed vectors in at <emb> and regresses "
                "them at [CLIP OUT]",
    pipeline_tag="text-generation",
    load=_load,
    export=_export,
    card_metrics={"general_gpt": (
        CardMetric("recall_at_1", "recall", "feature-extraction", "retrieval recall@1 from [CLIP OUT]"),
        CardMetric("caption_word_f1", "f1", "text-generation", "word F1 of captions generated from vectors"),
    )},
)
