"""Refine generated image descriptions with a text LLM, as MiniGPT-4 cleaned its second-stage
data: fix grammar, drop repeated and unfinished sentences, keep the facts. Replies that
apologise or refuse, mention sources, or come back cut off are rejected and retried.

    python data_gen/refine_descriptions.py --input outputs/data_gen/llava_instruct.json
    python data_gen/refine_descriptions.py --input data.json --base-url http://localhost:8080/v1 --model smollm2

Rewrites every record whose one answer is a description of at least `--min-words` words;
other records pass through unchanged. A description whose refinement fails `--max-attempts`
times is left out of the output and counted. Writes `--output` (default `<input stem>.refined.json`)
with its provenance and work files beside it, resumable like `make_llava_instruct.py`, and
like it waits up to `--max-outage` seconds for a server that stopped answering.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from mmpeft.instruct.backends import OpenAIBackend, Sampling, TransformersBackend, default_gguf
from mmpeft.instruct.prompts import load_prompt
from mmpeft.instruct.run import Job, ServerUnreachable, generate, write_atomic, write_outputs
from mmpeft.instruct.store import ResultStore, job_key

HERE = Path(__file__).resolve().parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="LLaVA JSON")
    p.add_argument("--output", default=None)
    p.add_argument("--min-words", type=int, default=20)
    p.add_argument("--prompts", default=str(HERE / "prompts"))
    p.add_argument("--model", default=None)
    p.add_argument("--base-url", default=None)
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--max-outage", type=float, default=600.0, help="seconds to wait for a server that stops answering")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ##### input: the descriptions to refine
    source = Path(args.input)
    records = json.loads(source.read_text())
    prompt = load_prompt("refine", args.prompts)
    sampling = Sampling(args.max_new_tokens, args.temperature, 0.9)
    backend = (OpenAIBackend(args.base_url, args.model, sampling, args.api_key_env, args.concurrency)
               if args.base_url else TransformersBackend(args.model or default_gguf(), sampling, args.batch_size))
    jobs, passed = [], []
    for k, rec in enumerate(records):
        answers = [t for t in rec.get("conversations", []) if t.get("from") == "gpt"]
        rid = str(rec.get("id", k))
        if len(answers) == 1 and len(answers[0]["value"].split()) >= args.min_words:
            jobs.append(Job(job_key(rid, "refine", prompt.version, backend.name, args.seed), "refine", rid,
                            rec.get("image"), prompt.messages(answers[0]["value"]), prompt.version, original=rec))
        else:
            passed.append(rec)
    print(f"{len(jobs)} descriptions to refine, {len(passed)} other records kept as they are")

    def refined(job, pairs):
        turns = [dict(t, value=pairs[0][1]) if t.get("from") == "gpt" else t for t in job.original["conversations"]]
        return {**job.original, "conversations": turns}

    ##### refinement, stored as it arrives
    output = Path(args.output or source.with_name(source.stem + ".refined.json"))
    store = ResultStore(output.with_name(output.name + ".work"))
    try:
        stats = generate(jobs, backend, store, args.seed, args.max_attempts, set(), refined,
                         progress=not args.no_progress, max_outage=args.max_outage)
    except ServerUnreachable as err:
        sys.exit(f"stopped: {err}; the same command continues where this run stopped")
    written, _ = write_outputs(jobs, store, output)
    if passed:  # the records that needed no refinement go after the refined ones
        data = json.loads(output.read_text()) + passed
        write_atomic(output, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"refined {written} of {len(jobs)}; rejected replies: {dict(stats.rejected)}; left out after "
          f"{args.max_attempts} replies: {dict(stats.given_up)}; left for a rerun after server errors: "
          f"{stats.left_for_rerun}; wrote {written + len(passed)} records to {output}")


if __name__ == "__main__":
    main()
