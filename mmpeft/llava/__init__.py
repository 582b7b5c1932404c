"""LLaVA: a CLIP vision tower, a connector and a causal LM, trained in two stages
(`llava_pretrain`: the connector alone; `llava_finetune`: LoRA / QLoRA on the LM with the
connector). The other families build on its assembly (`mmpeft.llava.model`)."""

from __future__ import annotations

from mmpeft.families import CardMetric, Family, Loaded


def _load(folder, lm=None, clip=None, diffusion=None, base_kwargs=None) -> Loaded:
    from mmpeft.llava.checkpoint import load_llava

    model, processor, settings = load_llava(folder, lm, clip, base_kwargs=base_kwargs)
    return Loaded(model, processor, settings, folder=folder)


def _export(folder, out, lm=None, clip=None) -> dict:
    from mmpeft.llava.export import export_llava

    return export_llava(folder, out, lm, clip)


def answer_rows(name: str, m: dict) -> list:
    """The pipeline's figures of a LLaVA-style run (loss, held-out answer accuracy)."""
    before = m.get("answer_accuracy_before")  # not measured when the LM loaded partitioned (ZeRO-3)
    rows = [(name, "training loss, first -> last step", m["last_loss"], f"first {m['first_loss']:.3f}"),
            (name, "answer accuracy on held-out questions", m["answer_accuracy_after"],
             f"before training {'not measured' if before is None else f'{before:.3f}'}, chance {m['chance']:.3f}")]
    if "answer_accuracy_image_swapped" in m:  # the control: what the questions alone give
        rows.append((name, "answer accuracy, each image swapped for another", m["answer_accuracy_image_swapped"],
                     f"the image carries {m['image_gap']:+.3f}"))
    return rows


ANSWER_ACCURACY = CardMetric("answer_accuracy_after", "accuracy", "visual-question-answering",
                             "answer accuracy on held-out questions")

FAMILY = Family(
    name="llava",
    recipes=("llava_pretrain", "llava_finetune"),
    description="a LLaVA-style vision-language model (CLIP vision tower, connector, causal LM)",
    pipeline_tag="image-text-to-text",
    load=_load,
    export=_export,
    card_metrics={"llava_pretrain": (ANSWER_ACCURACY,), "llava_finetune": (ANSWER_ACCURACY,)},
    figures={"llava_pretrain": answer_rows, "llava_finetune": answer_rows},
)
