"""A LLaVA export answers through transformers' standard interfaces: its processor's chat
template prompts it exactly as the run was trained, and the image-text-to-text pipeline,
given chat messages, answers as mmpeft's own evaluation does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from transformers.utils.chat_template_utils import render_jinja_template

from mmpeft.data.templates import VICUNA_V1
from mmpeft.llava.chat_templates import export_chat_template

ROOT = Path(__file__).resolve().parents[3]
# enough steps that the greedy answers differ from one question to the next
STEPS = 200


def typed(question: str, image=None) -> list[dict]:
    """One user turn as the pipeline and OpenAI-compatible servers send it."""
    part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


def test_vicuna_v1_template_writes_llava_15_conversations():
    template = export_chat_template("vicuna_v1", None)
    two_turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And the square?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
    ]
    (text,), (answers,) = render_jinja_template(conversations=[two_turns], chat_template=template,
                                                return_assistant_tokens_mask=True, eos_token="</s>")
    assert text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat colour is the circle? "
        "ASSISTANT: Red.</s>USER: And the square? ASSISTANT: Blue.</s>")
    assert [text[a:b] for a, b in answers] == [" Red.</s>", " Blue.</s>"]  # what the format's loss covers
    (prompt,), _ = render_jinja_template(conversations=[two_turns[:3]], chat_template=template,
                                         add_generation_prompt=True, eos_token="</s>")
    assert prompt.endswith("ASSISTANT: Red.</s>USER: And the square? ASSISTANT:")
    # a system message replaces the default; a lone image written after the question moves to the front
    strings = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which shape? <image>"}]
    (prompt,), _ = render_jinja_template(conversations=[strings], chat_template=template,
                                         add_generation_prompt=True, eos_token="</s>")
    assert prompt == "Be brief. USER: <image>\nWhich shape? ASSISTANT:"
    for messages in (two_turns, strings):  # the same text as the format mmpeft trains with
        plain = [{**m, "content": m["content"] if isinstance(m["content"], str) else
                  "".join("<image>\n" if p["type"] == "image" else p["text"] for p in m["content"])}
                 for m in messages]
        ends = messages[-1]["role"] == "user"
        (rendered,), _ = render_jinja_template(conversations=[messages], chat_template=template,
                                               add_generation_prompt=ends, eos_token="</s>")
        assert rendered == "".join(p for p, _ in VICUNA_V1.pieces(plain, "</s>", add_generation_prompt=ends))


def test_tokenizer_format_keeps_the_lm_template_after_typed_content():
    from mmpeft.tiny.zoo.tokenizers import CHAT_TEMPLATE

    template = export_chat_template("tokenizer", CHAT_TEMPLATE)
    assert template.endswith(CHAT_TEMPLATE) and export_chat_template("tokenizer", template) == template
    (text,), (answers,) = render_jinja_template(
        conversations=[typed("What colour is the circle?") + [{"role": "assistant", "content": "red"}]],
        chat_template=template, return_assistant_tokens_mask=True)
    assert text == ("<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n"
                    "<|im_start|>assistant\nred<|im_end|>\n")
    assert [text[a:b] for a, b in answers] == ["red<|im_end|>"]
    with pytest.raises(TypeError, match="concatenate"):  # what the LM's own template does with typed content
        render_jinja_template(conversations=[typed("What colour is the circle?")], chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module", params=["tokenizer", "vicuna_v1"])
def exported(request, small_world, small_zoo, tmp_path_factory):
    """Stage 2 trained for a few steps in one conversation format, and its export."""
    from mmpeft.export import export_run

    fmt = request.param
    run = tmp_path_factory.mktemp(f"export_{fmt}") / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "llava_finetune.py"), f"fixture.world_dir={small_world}",
           f"fixture.zoo_dir={small_zoo[0]}", f"training.output_dir={run}", f"training.max_steps={STEPS}",
           f"training.save_steps={STEPS}", "training.micro_batch_size=4", "training.log_steps=10",
           "eval.questions=null", "threads=1", "data.feature_cache=null", "model.init_connector=null",
           f"data.conversation_format={fmt}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return fmt, run, export_run(run, run.parent / "export")


def _questions(small_world):
    """The first held-out question of each type (yes/no, colour, shape, size, count, ...)."""
    from mmpeft.eval.answers import read_questions

    first = {}
    for row in read_questions(small_world / "eval" / "test_qa.jsonl", small_world / "coco"):
        first.setdefault(row["type"], row)
    return list(first.values())


def _encoder(run, fmt):
    from mmpeft.data.conversation import ConversationEncoder
    from mmpeft.data.templates import chat_template
    from mmpeft.llava.checkpoint import load_llava

    model, processor, _ = load_llava(run)
    tokenizer = processor.tokenizer
    return model, ConversationEncoder(tokenizer, processor.image_processor, chat_template(tokenizer, fmt), "<image>",
                                      model.config.image_seq_length, 256)


def test_exported_template_prompts_as_the_run_was_trained(exported, small_world):
    from transformers import AutoProcessor

    from mmpeft.data.conversation import Sample
    from mmpeft.data.templates import SeparatorFormat, chat_template

    fmt, run, export = exported
    processor = AutoProcessor.from_pretrained(export)  # no mmpeft code from here on
    assert (export / "chat_template.jinja").read_text() == processor.chat_template
    _, encoder = _encoder(run, fmt)
    row = _questions(small_world)[0]
    sample = Sample(row["id"], [{"role": "user", "content": f"<image>\n{row['q']}"}], [row["image"]])
    if isinstance(encoder.template, SeparatorFormat):
        ours = "".join(p for p, _ in encoder.template.pieces(sample.messages, encoder.tokenizer.eos_token, True))
        assert ours.endswith(f"USER: <image>\n{row['q']} ASSISTANT:")
    else:
        ours = encoder.tokenizer.apply_chat_template(sample.messages, chat_template=encoder.template, tokenize=False,
                                                     add_generation_prompt=True)
        chat_template(processor.tokenizer, "tokenizer")  # a run can still train on the export in this format
    text = processor.apply_chat_template(typed(row["q"]), add_generation_prompt=True)
    assert text == ours
    assert processor.apply_chat_template(sample.messages, add_generation_prompt=True) == ours
    image = Image.open(row["image"]).convert("RGB")
    assert processor(images=image, text=text)["input_ids"][0] == encoder.encode_prompt(sample)
    # what the image-text-to-text pipeline feeds the model: the template, then the processor on its text
    served = processor.apply_chat_template(typed(row["q"], image), add_generation_prompt=True, tokenize=True,
                                           return_dict=True)
    assert served["input_ids"][0] == encoder.encode_prompt(sample)


def test_pipeline_with_chat_messages_answers_as_mmpeft_evaluation(exported, small_world):
    from transformers import pipeline

    from mmpeft.eval.answers import normalise_answer
    from mmpeft.llava.evaluation import answer_accuracy

    fmt, run, export = exported
    rows = _questions(small_world)
    model, encoder = _encoder(run, fmt)
    ours = answer_accuracy(model, encoder, rows)
    pipe = pipeline("image-text-to-text", model=str(export))
    served = []
    for row in rows:
        with Image.open(row["image"]) as image:
            out = pipe(text=typed(row["q"], image.convert("RGB")), return_full_text=False,
                       generate_kwargs={"max_new_tokens": 6, "do_sample": False})
        served.append(out[0]["generated_text"].strip())
    assert served == [e["answer"] for e in ours["examples"]]
    assert len(set(served)) > 1  # answers that depend on the question, so a wrong prompt would show
    accuracy = sum(normalise_answer(a) == normalise_answer(r["a"]) for a, r in zip(served, rows, strict=True))
    assert accuracy / len(rows) == ours["accuracy"]
