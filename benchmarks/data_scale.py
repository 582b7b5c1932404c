"""Training data at LLaVA-665K's scale: time to the first training batch and peak host
memory of one rank, conversations held in memory and encoded at every start
(`data.prepared: null`) against conversations prepared once on disk (`data.prepared`), at
two record counts, measured side by side in one run; and caption shards with every image's
bytes read at the start against shards indexed and read when a batch needs them.

    python benchmarks/data_scale.py                        # 100K and 665K records, 100K caption pairs
    python benchmarks/data_scale.py --records 20000,100000 --pairs 20000

The records are synthetic, in LLaVA-665K's shape: an image and three question-answer rounds
of about 350 words (about 500 Vicuna tokens), over 16 distinct images, tokenized with
Llama-2's vocabulary (Vicuna's) in LLaVA-1.5's `vicuna_v1` format, 576 tokens an image,
`max_length` 2048. Each side runs in a fresh process, so its peak memory is its own: "peak"
is the most resident memory the process reached, less what it held once its imports and
tokenizer were loaded. The prepared side is measured twice: the first start, which prepares
the set (one rank here; N ranks each take 1/N of it), and a later start of the same data
and settings (every resume, rerun and other rank of a later run), which opens it.

Targets (at the larger count): the later start at least 5x faster and the peak at least 5x
lower than holding the records in memory, and the peak growing by less than 1 GB from the
smaller count to the larger.
"""

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

TARGET = 5.0
GROWTH_LIMIT_GB = 1.0
WORDS = ("the a an of in on at to with from by near behind under above left right top bottom small large red blue "
         "green yellow white black man woman child dog cat bird car bus train plate table chair window street "
         "building tree sky water field grass sign person people holding sitting standing walking looking "
         "wearing riding playing eating there is are two three several many some other its their this that "
         "picture image photo shows scene appears seems likely because while which who what where how why").split()


def write_records(path: Path, n: int, images: int = 16, seed: int = 0) -> None:
    """`n` LLaVA-format records of about 350 words, written one at a time."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w") as f:
        f.write("[")
        for i in range(n):
            turns = []
            for r in range(3):
                question = f"{words(10)}?"
                turns += [{"from": "human", "value": ("<image>\n" if r == 0 else "") + question},
                          {"from": "gpt", "value": words(rng.randint(90, 120)) + "."}]
            f.write(("," if i else "") + json.dumps({"id": f"{i:07d}", "image": f"{i % images}.jpg",
                                                     "conversations": turns}))
        f.write("]")


def write_images(folder: Path, n: int = 16) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", (336, 336), (15 * k, 100, 200 - 10 * k)).save(folder / f"{k}.jpg")


def write_shards(folder: Path, pairs: int, per_shard: int = 10000) -> None:
    """img2dataset-style shards: `key.jpg` (a 64-pixel JPEG, about 1 KB) and `key.txt`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    for s in range(0, pairs, per_shard):
        with tarfile.open(folder / f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, pairs)):
                buf = io.BytesIO()
                Image.new("RGB", (64, 64), (i % 256, (i // 256) % 256, 90)).save(buf, format="JPEG")
                for name, data in ((f"{i:08d}.jpg", buf.getvalue()),
                                   (f"{i:08d}.txt", " ".join(rng.choice(WORDS) for _ in range(12)).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def old_caption_shards(pattern: str):
    """Caption pairs with every image's bytes read into memory at the start, as the shard
    reader did before it indexed members."""
    import glob

    from mmpeft.data.readers import caption_sample

    samples = []
    for shard in sorted(glob.glob(pattern)):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                if info.isfile():
                    key, _, ext = info.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        samples += [caption_sample(f"{shard}/{k}", p["jpg"], p["txt"].decode()) for k, p in members.items()]
    return samples


def child(args) -> None:
    """One side, in this process: build the dataset as the recipe does and take its first
    batch; print the seconds and peak memory as JSON."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import CLIPImageProcessor

    from mmpeft.data.conversation import ConversationEncoder
    from mmpeft.data.dataset import collate_conversations, conversation_dataset
    from mmpeft.data.prepared import files_fingerprint
    from mmpeft.data.readers import iter_llava_json, read_caption_shards
    from mmpeft.data.templates import chat_template
    from mmpeft.standins.tokenizers import llama2_tokenizer
    from mmpeft.train.sampler import GroupedBatchSampler

    torch.set_num_threads(args.threads)
    tokenizer = llama2_tokenizer(args.vocab_cache)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.pad_token = tokenizer.unk_token
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    shards = args.data.endswith(".tar")
    encoder = ConversationEncoder(tokenizer, processor, chat_template(tokenizer, "plain" if shards else "vicuna_v1"),
                                  "<image>", 576, 2048)
    base, start = _rss_bytes(), time.perf_counter()
    if shards:
        samples = (lambda: old_caption_shards(args.data)) if args.side == "memory" else \
            (lambda: read_caption_shards(args.data))
    else:
        samples = lambda: iter_llava_json(args.data, args.images)  # noqa: E731
    prepared = None if args.side == "memory" else args.prepared
    files = sorted(Path(args.data).parent.glob("*.tar")) if shards else [args.data]
    dataset = conversation_dataset(samples, {"files": files_fingerprint(files), "images": args.images}, encoder,
                                   prepared, True, args.data, log=lambda _: None)
    sampler = GroupedBatchSampler(dataset.lengths, dataset.has_image, 16)
    batch = next(iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_conversations(0))))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_bytes": peak - base, "records": len(dataset),
                      "batch_tokens": int(batch["attention_mask"].sum())}))


def run_side(side: str, data: Path, images: Path, prepared: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--data", str(data), "--images", str(images),
           "--prepared", str(prepared), "--threads", str(args.threads)]
    cmd += ["--vocab-cache", args.vocab_cache] if args.vocab_cache else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
    if proc.returncode:
        raise RuntimeError(f"{side} on {data} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def three_starts(data: Path, images: Path, prepared: Path, args, what: str) -> dict:
    """The data held in memory, then prepared (the first start), then opened (a later start)."""
    row = {}
    for side, name in (("memory", "memory"), ("prepared", "first start"), ("prepared", "later start")):
        row[name] = run_side(side, data, images, prepared, args)
        print(f"{what:>22}, {name:>12}: {row[name]['seconds']:7.1f} s to the first batch, peak "
              f"{row[name]['peak_bytes'] / 2**30:5.2f} GiB", flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", default="100000,665000", help="two record counts, comma-separated")
    p.add_argument("--pairs", type=int, default=100000, help="caption pairs in the shard set (0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="a folder for the data (default: a temporary one)")
    p.add_argument("--vocab-cache", default=None, help="where the vocabulary files are (default: mmpeft's cache)")
    p.add_argument("--output", default="outputs/benchmarks/data_scale.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.side = args.child
        return child(args)
    counts = [int(c) for c in args.records.split(",")]
    if len(counts) != 2 or counts[0] >= counts[1]:
        raise SystemExit("--records takes two counts, smaller first (e.g. 100000,665000)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        images = work / "images"
        write_images(images)
        results = {"llava_json": {}, "caption_shards": {}}
        for n in counts:
            data = work / f"llava_{n}.json"
            if not data.exists():
                write_records(data, n)
            results["llava_json"][n] = three_starts(data, images, work / "prepared", args, f"{n:,} records")
        if args.pairs:
            shards = work / "shards"
            if not shards.exists():
                write_shards(shards, args.pairs)
            results["caption_shards"] = three_starts(Path(f"{shards}/*.tar"), images, work / "prepared", args,
                                                     f"{args.pairs:,} caption pairs")
    return report(results, counts, args)


def report(results: dict, counts: list[int], args) -> dict:
    big, small = (results["llava_json"][n] for n in (counts[1], counts[0]))
    speed = big["memory"]["seconds"] / big["later start"]["seconds"]
    first = big["memory"]["seconds"] / big["first start"]["seconds"]
    memory = big["memory"]["peak_bytes"] / max(big["later start"]["peak_bytes"], big["first start"]["peak_bytes"])
    growth = (max(big["first start"]["peak_bytes"], big["later start"]["peak_bytes"])
              - max(small["first start"]["peak_bytes"], small["later start"]["peak_bytes"])) / 2**30
    met = speed >= TARGET and memory >= TARGET and growth < GROWTH_LIMIT_GB
    print(f"at {counts[1]:,} records: later start {speed:.1f}x faster (first start {first:.1f}x), peak memory "
          f"{memory:.1f}x lower, growth from {counts[0]:,} {growth:+.2f} GiB; targets {TARGET}x, {TARGET}x, "
          f"< {GROWTH_LIMIT_GB} GiB: {'met' if met else 'MISSED'}")
    out = {"results": results, "speed_ratio": speed, "first_start_ratio": first, "memory_ratio": memory,
           "growth_gib": growth, "target": TARGET, "met": met, "settings": vars(args)}
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
