"""Interleaved generation with a trained MiniGPT-5: text, and when the model emits vokens, the
image Stable Diffusion draws from them with classifier-free guidance. Writes an HTML page
with the images beside the text.

    python recipes/minigpt5_generate.py outputs/minigpt5_stage2_tiny --prompt "What happens next?" \\
        --context "There is a small red circle at the top left." path/to/step1.jpg --out page/index.html
    python recipes/minigpt5_generate.py outputs/minigpt5_stage2_tiny --stories test.story-in-sequence.json \\
        --image-folder images/test --limit 8 --out page/index.html

With `--stories`, each story's last step is asked for from the steps before it (as many as
the run's `data.history`: null, all of them), and the true last step is shown beside the answer.
"""

import argparse
from pathlib import Path

import torch

from mmpeft.data.conversation import IMAGE_MARKER, ConversationEncoder, Sample
from mmpeft.data.stories import read_vist, story_context
from mmpeft.data.templates import chat_template
from mmpeft.minigpt5.checkpoint import load_minigpt5
from mmpeft.minigpt5.evaluation import interleaved_generate
from mmpeft.pages import write_story_page
from mmpeft.train.placement import rank_device


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a MiniGPT-5 output or checkpoint folder")
    parser.add_argument("--prompt", help="what to ask (after the context)")
    parser.add_argument("--context", nargs=2, action="append", default=[], metavar=("TEXT", "IMAGE"),
                        help="an earlier step: its sentence and image (repeat for several)")
    parser.add_argument("--stories", help="VIST story-in-sequence JSON: ask for each story's last step")
    parser.add_argument("--image-folder", help="the stories' images")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--out", default="minigpt5_page/index.html")
    parser.add_argument("--device", default=None, help="where the models run (default: the GPU when there is one)")
    args = parser.parse_args(argv)
    if bool(args.prompt) == bool(args.stories):
        parser.error("give either --prompt (with optional --context) or --stories with --image-folder")

    model, processor, pipeline, settings = load_minigpt5(args.model)
    device = torch.device(args.device) if args.device else rank_device()
    model, pipeline = model.to(device), pipeline.to(device)
    cfg = settings["config"]
    encoder = ConversationEncoder(processor.tokenizer, processor.image_processor,
                                  chat_template(processor.tokenizer, cfg["data"]["conversation_format"]),
                                  settings["image_token"], model.llava_model.config.image_seq_length, 4096)
    asks = []  # (id, context steps, prompt, truth)
    if args.prompt:
        asks.append(("prompt", [(t, Path(im)) for t, im in args.context], args.prompt, None))
    else:
        history = cfg["data"]["history"]
        for sid, steps in list(read_vist(args.stories, args.image_folder).items())[: args.limit]:
            context = [(s.text, s.image) for s in story_context(steps, len(steps) - 1, history)]
            asks.append((sid, context, cfg["data"]["prompts"]["multimodal"], steps[-1]))
    rows = []
    for sid, context, prompt, truth in asks:
        user = "".join(f"{text} {IMAGE_MARKER}\n" for text, _ in context) + prompt
        sample = Sample(sid, [{"role": "user", "content": user}], [im for _, im in context])
        text, image = interleaved_generate(model, pipeline, encoder, sample, args.guidance, steps=args.steps)
        row = {"id": sid, "context": context, "prompt": prompt, "text": text, "image": image}
        if truth is not None:
            row.update(truth_text=truth.text, truth_image=truth.image)
        rows.append(row)
        print(f"{sid}: {text!r} " + ("+ image" if image is not None else "(no vokens)"))
    print(f"page: {write_story_page(args.out, rows, f'MiniGPT-5: {args.model}')}")


if __name__ == "__main__":
    main()
