"""Flamingo's fusion on any causal LM: the LM stays frozen and reads images through a
Perceiver Resampler and gated cross-attention layers."""

from __future__ import annotations

from mmpeft.families import Family, Loaded
from mmpeft.llava import ANSWER_ACCURACY, answer_rows


def _load(folder, lm=None, clip=None, diffusion=None, base_kwargs=None) -> Loaded:
    from types import SimpleNamespace

    from mmpeft.flamingo.checkpoint import load_flamingo

    model, tokenizer, image_processor, settings = load_flamingo(folder, lm, clip, base_kwargs=base_kwargs)
    return Loaded(model, SimpleNamespace(tokenizer=tokenizer, image_processor=image_processor), settings,
                  folder=folder)


FAMILY = Family(
    name="flamingo",
    recipes=("flamingo",),
    description="a Flamingo-style model: a frozen causal LM reading images through a Perceiver Resampler and "
                "gated cross-attention layers",
    pipeline_tag="image-text-to-text",
    load=_load,
    no_export="a Flamingo run leaves the LM as it was, so there is nothing to merge; share the run folder "
              "itself (mmpeft push) and load it with mmpeft.load",
    card_metrics={"flamingo": (ANSWER_ACCURACY,)},  # scored as LLaVA is, on the same questions
    figures={"flamingo": answer_rows},
)
