"""Synthesize LLaVA-format instruction data from image captions and object boxes with a
text-only LLM, as LLaVA built its 158K set: conversations (from captions), detailed
descriptions and complex reasoning (from captions and boxes).

    python data_gen/make_llava_instruct.py                      # the tiny world, SmolLM2-135M-Instruct, CPU
    python data_gen/make_llava_instruct.py --captions captions_train2017.json \\
        --instances instances_train2017.json --base-url http://localhost:8000/v1 --model my-model
    python data_gen/make_llava_instruct.py --dry-run            # print the prompts, call nothing

Writes `--output` (LLaVA JSON the LLaVA recipes read), `<output>.provenance.jsonl` (model,
backend, prompt version, sampling and seed of each record) and, in `<output>.work/`,
`accepted.jsonl` and `rejected.jsonl` (every rejected reply with its reason). Results are
stored as they arrive: after a crash or kill, the same command continues where it stopped.
A server that stops answering is waited for, with backoff, up to `--max-outage` seconds;
then the run stops (exit status 1) and the same command continues where it stopped.
"""

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

from mmpeft.instruct.backends import (
    OpenAIBackend,
    Sampling,
    TransformersBackend,
    count_prompt_tokens,
    default_gguf,
    load_tokenizer,
)
from mmpeft.instruct.context import BadInput, read_coco_contexts, read_jsonl_contexts
from mmpeft.instruct.prompts import TASKS, detail_questions, load_prompt
from mmpeft.instruct.run import ServerUnreachable, generate, llava_record, plan_jobs, write_outputs
from mmpeft.instruct.store import ResultStore

HERE = Path(__file__).resolve().parent


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_argument_group("input (default: the tiny world's COCO training files, built on first use)")
    src.add_argument("--captions", help="COCO captions_*.json")
    src.add_argument("--instances", help="COCO instances_*.json (boxes; without it tasks that need boxes are skipped)")
    src.add_argument("--jsonl", help="JSONL of {image, captions, boxes: [{category, bbox: [x1, y1, x2, y2]}]}")
    src.add_argument("--image-prefix", default=None, help="prepended to each image path in the output")
    src.add_argument("--limit", type=int, default=None, help="first N images (default: all; 4 on the tiny world)")
    src.add_argument("--max-captions", type=int, default=5)
    src.add_argument("--max-boxes", type=int, default=20)
    src.add_argument("--crowd", choices=("drop", "keep"), default="drop", help="COCO crowd boxes")
    src.add_argument("--skip-bad-records", action="store_true",
                     help="leave out images with no captions, an unknown category or a malformed box (or JSONL\n"
                          "lines that are not JSON) and count them by reason; without it the first one stops\n"
                          "the run, named with its file and record")
    gen = p.add_argument_group("generation")
    gen.add_argument("--tasks", default=",".join(TASKS))
    gen.add_argument("--prompts", default=str(HERE / "prompts"), help="folder of task prompt files")
    gen.add_argument("--model", default=None, help="folder, Hub id or .gguf file (local), or the server's model name")
    gen.add_argument("--base-url", default=None, help="an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    gen.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    gen.add_argument("--concurrency", type=int, default=4, help="requests in flight (server)")
    gen.add_argument("--timeout", type=float, default=120.0, help="seconds per request (server)")
    gen.add_argument("--max-retries", type=int, default=5, help="retries of a failed request (server)")
    gen.add_argument("--max-outage", type=float, default=600.0,
                     help="seconds to wait, with backoff, for a server that stopped answering before stopping")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts per batch (local)")
    gen.add_argument("--max-new-tokens", type=int, default=384)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-attempts", type=int, default=3, help="replies tried per record before giving up")
    gen.add_argument("--threads", type=int, default=None, help="torch CPU threads (local)")
    out = p.add_argument_group("output")
    out.add_argument("--output", default="outputs/data_gen/llava_instruct.json")
    out.add_argument("--dry-run", action="store_true", help="print the prompts and a token estimate, call nothing")
    out.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def read_input(args):
    """`(contexts, report, whether boxes were given)` from `--jsonl`, the COCO files, or the
    tiny world's training files (then `--image-prefix` and `--limit` get its defaults)."""
    if args.jsonl:
        contexts, report = read_jsonl_contexts(args.jsonl, args.max_captions, args.max_boxes,
                                               skip_bad_records=args.skip_bad_records)
        return contexts, report, True
    captions, instances, prefix = args.captions, args.instances, args.image_prefix
    if not captions:
        from mmpeft.tiny import cache_root, tiny_world

        world = tiny_world(cache_root(None, os.environ))
        captions = world / "coco/annotations/captions_train.json"
        instances = world / "coco/annotations/instances_train.json"
        args.image_prefix = "train/" if prefix is None else prefix
        args.limit = 4 if args.limit is None else args.limit
        print(f"input: the tiny world at {world} (first {args.limit} training images)")
    contexts, report = read_coco_contexts(captions, instances, args.max_captions, args.max_boxes, args.crowd,
                                          skip_bad_records=args.skip_bad_records)
    return contexts, report, instances


def main(argv=None):
    args = parse_args(argv)
    if args.max_outage < 0:
        sys.exit(f"--max-outage: {args.max_outage} is negative; give the seconds to wait for the server")
    if args.threads:
        torch.set_num_threads(args.threads)

    ##### input
    try:
        contexts, report, instances = read_input(args)
    except BadInput as err:
        sys.exit(f"input: {err}; --skip-bad-records leaves such images out and counts them")
    for line in report.lines():
        print(f"input: {line}")
    contexts = contexts[: args.limit] if args.limit else contexts
    for ctx in contexts:
        ctx.image = (args.image_prefix or "") + ctx.image
    known = sorted({name for ctx in contexts for name, _ in ctx.boxes})

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        sys.exit(f"--tasks: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    prompts = {t: load_prompt(t, args.prompts) for t in tasks}
    if not instances:
        dropped = [t for t, p in prompts.items() if p.uses_boxes]
        prompts = {t: p for t, p in prompts.items() if not p.uses_boxes}
        print(f"input: no boxes given (--instances), so these tasks are skipped: {', '.join(dropped)}")

    ##### teacher
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p)
    if args.base_url:
        if not args.model:
            sys.exit("--base-url needs --model (the model name the server knows)")
        backend = OpenAIBackend(args.base_url, args.model, sampling, args.api_key_env, args.concurrency,
                                args.timeout, args.max_retries)
    else:
        model = args.model or default_gguf()
        backend = None if args.dry_run else TransformersBackend(model, sampling, args.batch_size)
    name = backend.name if backend else Path(model).name if str(model).endswith(".gguf") else str(model)
    jobs = plan_jobs(contexts, prompts, name, args.seed, detail_questions(args.prompts))

    if args.dry_run:
        count = backend.count_tokens if backend else partial(count_prompt_tokens, load_tokenizer(model))
        tokens = 0
        for job in jobs:
            print(f"===== {job.record_id} ({job.task}, prompt {job.prompt_version})")
            for m in job.messages:
                print(f"--- {m['role']}\n{m['content']}")
            tokens += count(job.messages)
        print(f"dry run: {len(jobs)} requests, about {tokens:,} prompt tokens and at most "
              f"{len(jobs) * args.max_new_tokens:,} generated tokens; nothing was sent")
        return

    ##### generation, stored as it arrives
    output = Path(args.output)
    store = ResultStore(output.with_name(output.name + ".work"))
    print(f"teacher: {backend.kind} {backend.name}; {len(jobs)} records to make "
          f"({sum(store.done(j.key) for j in jobs)} already done)")
    try:
        stats = generate(jobs, backend, store, args.seed, args.max_attempts, set(known),
                         to_record=lambda job, pairs: llava_record(job, pairs, args.seed),
                         progress=not args.no_progress, max_outage=args.max_outage)
    except ServerUnreachable as err:
        sys.exit(f"stopped: {err}; the same command continues where this run stopped")
    written, repeated = write_outputs(jobs, store, output)

    ##### summary
    tok_s = stats.completion_tokens / stats.seconds if stats.seconds else 0.0
    print(f"accepted this run: {dict(stats.accepted)}; rejected replies: {dict(stats.rejected)}; "
          f"records given up after {args.max_attempts} replies: {dict(stats.given_up)}")
    if stats.left_for_rerun:
        print(f"{stats.left_for_rerun} records the server refused {args.max_attempts} times are left for a rerun "
              f"(the errors are in {store.rejected_path})")
    print(f"repeated questions dropped: {stats.repeated_questions} within records, {repeated} across tasks")
    print(f"{stats.completion_tokens:,} tokens generated in {stats.seconds:.0f} s ({tok_s:.1f} tokens/s)")
    print(f"wrote {written} records to {output} (provenance: {output.name}.provenance.jsonl; "
          f"rejects: {store.rejected_path})")
    summary = {"jobs": len(jobs), "records": written, "accepted": dict(stats.accepted),
               "rejected": dict(stats.rejected), "given_up": dict(stats.given_up),
               "left_for_rerun": stats.left_for_rerun,
               "skipped_images": dict(report.skipped),
               "tokens": stats.completion_tokens, "seconds": round(stats.seconds, 1)}
    output.with_name(output.name + ".summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
