"""LLaVA stage 1 with the frozen vision tower's features cached against running the tower
(and decoding the images) every step: the same model, samples, batches and optimizer,
measured side by side in one process.

    python benchmarks/llava_feature_cache.py                     # tiny preset, tiny world, CPU
    python benchmarks/llava_feature_cache.py --preset llava-1.5-7b --device cuda --data 'data/558k/*.tar'

A step is what the recipe does: load the batch (decode and preprocess the images, or read
their cached features), forward, backward, AdamW on the connector. Runs alternate after a
warm-up; the median of `--repeats` is reported with the spread, and the split of one
uncached step into tower, the rest the cache saves and what a cached step still does says
where the time goes. Target: at least 3x.
"""

import tempfile
import time

import torch
from side_by_side import compare, parser, preset_and_data, report

from mmpeft.data.conversation import ConversationEncoder
from mmpeft.data.dataset import ConversationDataset, collate_conversations
from mmpeft.data.feature_cache import prepare_feature_cache, tower_features
from mmpeft.data.readers import read_caption_shards
from mmpeft.data.templates import chat_template
from mmpeft.llava.model import add_image_token, build_llava, llava_forward, llava_parts, load_base_models
from mmpeft.models.trainable import apply_trainability

TARGET = 3.0


def main(argv=None):
    args = parser(__doc__, 32, 8, "outputs/benchmarks/llava_feature_cache.json").parse_args(argv)
    preset, data = preset_and_data(args)
    lm, tokenizer, vision, image_processor = load_base_models(preset)
    torch.manual_seed(0)
    model = build_llava(vision, lm, add_image_token(tokenizer, lm), "mlp2x_gelu")
    model = apply_trainability(model, llava_parts(model), {"vision": "frozen", "connector": "full",
                                                           "llm": "frozen"}).to(args.device)
    encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, "plain"), "<image>",
                                  model.config.image_seq_length, 128)
    samples = read_caption_shards(data)[: args.batch_size * args.steps]
    collate = collate_conversations(tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        features = prepare_feature_cache(tmp, samples, encoder, vision, -2, log=lambda *_: None)
        build_seconds = time.perf_counter() - started
        datasets = {"cached features": ConversationDataset(samples, encoder, features=features),
                    "tower every step": ConversationDataset(samples, encoder)}
        runs = compare(model, lambda m, batch: llava_forward(m, batch).loss, datasets, collate, args)
        start = time.perf_counter()  # where an uncached step's time goes: decoding, then the tower on one batch
        pixels = collate([datasets["tower every step"][k] for k in range(args.batch_size)])["pixel_values"]
        decode_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            tower_features(vision, pixels.to(args.device), -2)
        tower_seconds = time.perf_counter() - start
    build_rate = len(features.index) / build_seconds  # images/s of the cache job, against the training step's
    step_rate = args.batch_size / (decode_seconds + tower_seconds)
    step_seconds = args.batch_size * len(runs["tower every step"]) / sum(runs["tower every step"])
    cached_seconds = args.batch_size * len(runs["cached features"]) / sum(runs["cached features"])
    report(runs, TARGET, args, f"an uncached step takes about {step_seconds:.3f} s, of which the tower's forward "
           f"{tower_seconds:.3f} s ({tower_seconds / step_seconds:.0%}) and image decoding and preprocessing most of "
           f"the rest that the cache saves; a cached step still takes {cached_seconds:.3f} s "
           f"({cached_seconds / step_seconds:.0%}): the connector, the LM's forward and the backward through it to "
           f"the connector, and AdamW; no cache removes that part, and 3x needs it to be at most a third of an "
           f"uncached step; building the cache took {build_seconds:.1f} s: {build_rate:.1f} images/s, against "
           f"{step_rate:.1f} images/s decoded and encoded inside an uncached training step "
           f"({build_rate / step_rate:.2f}x)",
           cache_build_seconds=build_seconds, tower_forward_seconds=tower_seconds, uncached_step_seconds=step_seconds,
           cached_step_seconds=cached_seconds, cache_build_images_per_s=build_rate,
           step_encoding_images_per_s=step_rate)


if __name__ == "__main__":
    main()
