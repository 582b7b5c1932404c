"""MiniGPT-5 stage 1 with the VAE latents of the target images and the SD text encoder's
caption encodings cached against encoding both every step: the same model, samples,
batches and optimizer, measured side by side in one process.

    python benchmarks/minigpt5_target_cache.py              # tiny preset, tiny world, CPU
    python benchmarks/minigpt5_target_cache.py --preset minigpt5 --device cuda --data 'data/cc3m/*.tar'

A step is what the recipe does: load the batch (decode the target images and run the VAE
encoder and the text encoder, or read both from the cache), forward with the diffusion
loss, backward, AdamW on the voken rows and the mapper. Runs alternate after a warm-up;
medians of `--repeats` with the spread, and the frozen encoders' share of an uncached step
says where the time goes. Target: at least 1.5x.
"""

import tempfile
import time

import torch
from side_by_side import compare, parser, preset_and_data, report

from mmpeft.data.conversation import ConversationEncoder
from mmpeft.data.diffusion_targets import CaptionTargets, LatentTargets, prepare_targets, sd_resolution
from mmpeft.data.readers import read_caption_shards
from mmpeft.data.stories import VokenDataset, caption_voken_sample, collate_vokens
from mmpeft.data.templates import chat_template
from mmpeft.llava.model import llava_parts, load_base_models
from mmpeft.minigpt5.checkpoint import assemble_minigpt5, empty_caption, mapper_settings, training_scheduler
from mmpeft.minigpt5.model import LossWeights, MiniGPT5, VokenMapper
from mmpeft.models.trainable import apply_trainability
from mmpeft.models.vokens import trainable_token_targets
from mmpeft.presets import load_diffusion

TARGET = 1.5


def main(argv=None):
    args = parser(__doc__, 16, 6, "outputs/benchmarks/minigpt5_target_cache.json").parse_args(argv)
    preset, data = preset_and_data(args)
    lm, tokenizer, vision, image_processor = load_base_models(preset)
    pipeline = load_diffusion(preset)
    torch.manual_seed(0)
    llava, voken_ids = assemble_minigpt5(lm, tokenizer, vision, pipeline, "<image>", 8, "mlp2x_gelu", -2)
    rows = {name: voken_ids for name in trainable_token_targets(llava).values()}
    llava = apply_trainability(llava, llava_parts(llava), {"vision": "frozen", "connector": "frozen",
                                                           "llm": "frozen"}, token_rows=rows)
    mapper = VokenMapper(**mapper_settings(lm.config.hidden_size, pipeline, d_model=128, heads=4, encoder_layers=2,
                                           decoder_layers=2, ff=512))
    model = MiniGPT5(llava, mapper, pipeline.unet, training_scheduler(pipeline), voken_ids, empty_caption(pipeline),
                     LossWeights(), 0.1, 5.0).to(args.device)
    encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, "tokenizer"), "<image>",
                                  llava.config.image_seq_length, 96)
    pairs = read_caption_shards(data)[: args.batch_size * args.steps]
    samples = [caption_voken_sample(s.id, s.images[0], s.messages[-1]["content"], "{caption}", 8) for s in pairs]
    size = sd_resolution(pipeline)
    with tempfile.TemporaryDirectory() as tmp:
        cached = (LatentTargets(pipeline.vae, size, tmp),
                  CaptionTargets(pipeline.tokenizer, pipeline.text_encoder, tmp))
        started = time.perf_counter()
        prepare_targets(cached[0], [s.targets[0] for s in samples], log=lambda *_: None)
        prepare_targets(cached[1], [s.captions[0] for s in samples], log=lambda *_: None)
        build_seconds = time.perf_counter() - started
        every = (LatentTargets(pipeline.vae, size), CaptionTargets(pipeline.tokenizer, pipeline.text_encoder))
        datasets = {"cached targets": VokenDataset(samples, encoder, voken_ids, *cached),
                    "encoded every step": VokenDataset(samples, encoder, voken_ids, *every)}
        runs = compare(model, lambda m, batch: m(**batch)["loss"], datasets, collate_vokens(tokenizer.pad_token_id),
                       args)
        batch = samples[: args.batch_size]  # where an uncached step's time goes: the frozen encoders alone
        start = time.perf_counter()
        every[0]([s.targets[0] for s in batch])
        every[1]([s.captions[0] for s in batch])
        encoder_seconds = time.perf_counter() - start
    step_seconds = args.batch_size * len(runs["encoded every step"]) / sum(runs["encoded every step"])
    report(runs, TARGET, args, f"an uncached step takes about {step_seconds:.2f} s, of which decoding the target "
           f"images and the VAE and text encoders {encoder_seconds:.2f} s ({encoder_seconds / step_seconds:.0%}); "
           f"building the cache took {build_seconds:.1f} s", cache_build_seconds=build_seconds,
           encoder_seconds=encoder_seconds, uncached_step_seconds=step_seconds)


if __name__ == "__main__":
    main()
