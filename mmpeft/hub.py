"""Sharing a finished run on the Hugging Face Hub: which files go up, the model card, and
the push itself.

From an output or checkpoint folder the push takes what training changed and what loading
needs: adapters, the extra trained modules (connector, voken rows, mappers, heads),
processor or tokenizer files, `mmpeft_config.json`, `metrics.json`, plus a `README.md`
model card made in memory. It never takes the frozen base models (the card names them),
DeepSpeed state, RNG states, sample pages or a retrieval index. All files go up in one
commit, and nothing under the folder is written, so a failed push is retried by running
it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mmpeft.families import CONFIG_FILE, Family, family_of

SHARED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja",
                   ".jsonl", ".png")  # the run's logged values and its training plot
SHARED_FOLDERS = ("runs",)  # TensorBoard's event files, which the Hub shows as training metrics
LEFT_OUT = {  # top-level entries never shared, with the reason a dry run prints
    "ds": "DeepSpeed engine and optimizer state",
    "samples": "sample page",
    "index": "retrieval index (lists local image files)",
    "trainer_state.json": "training state, for resuming",
    "README.md": "replaced by the generated model card",
}
class PushError(RuntimeError):
    """A push that could not be done; the message says why and how to retry."""


@dataclass
class Plan:
    """What a push of `folder` sends (`files`: path in repo and size) and what it leaves out
    (`left_out`: path and reason)."""

    folder: Path
    settings: dict
    metrics: dict
    files: list[tuple[str, int]]
    left_out: list[tuple[str, str]]


def read_run(folder: str | Path) -> tuple[dict, dict]:
    """A run folder's `mmpeft_config.json` and `metrics.json` (empty for a checkpoint)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: not an mmpeft output or checkpoint folder")
    settings = json.loads((folder / CONFIG_FILE).read_text())
    family_of(settings.get("recipe"), folder / CONFIG_FILE)  # an error naming the known recipes
    metrics_file = folder / "metrics.json"
    return settings, json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}


def plan_push(folder: str | Path) -> Plan:
    """The files a push of `folder` uploads and those it leaves out, with the reason."""
    folder = Path(folder)
    settings, metrics = read_run(folder)
    files, left_out, folders = [], [], {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(folder).as_posix()
        top = rel.split("/")[0]
        why = LEFT_OUT.get(top) or ("checkpoint (push its own folder to share it)" if top.startswith("checkpoint-")
                                    else None)
        if why and top != rel:  # a whole folder left out: one line for it
            folders.setdefault(top, [why, 0])[1] += 1
        elif why:
            left_out.append((rel, why))
        elif not path.name.endswith(SHARED_SUFFIXES) and top not in SHARED_FOLDERS:
            left_out.append((rel, "not a safetensors, JSON, tokenizer, log or plot file"))
        else:
            files.append((rel, path.stat().st_size))
    left_out += [(f"{top}/", f"{why}; {n} file{'s' * (n != 1)}") for top, (why, n) in folders.items()]
    return Plan(folder, settings, metrics, files, left_out)


def is_hub_id(source: str) -> bool:
    """Whether a base-model source is a Hub repo id (not a local folder)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(source).exists():
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _eval_results(family: Family, recipe: str, metrics: dict, settings: dict):
    from huggingface_hub import EvalResult

    eval_cfg = settings.get("config", {}).get("eval", {})
    pairs = eval_cfg.get("pairs")
    dataset = str(eval_cfg.get("questions") or (pairs or {}).get("path") or eval_cfg.get("stories") or "held-out split")
    results = []
    for m in family.card_metrics.get(recipe, ()):
        if isinstance(metrics.get(m.key), (int, float)):
            results.append(EvalResult(task_type=m.task, dataset_type="json", dataset_name=f"{recipe} eval: {dataset}",
                                      metric_type=m.metric, metric_name=m.name, metric_value=float(metrics[m.key])))
    return results


def launch_command(settings: dict) -> str:
    """The command the run was launched with, as recorded by the recipe."""
    launch = settings.get("launch")
    if not launch:
        return f"deepspeed recipes/{settings['recipe']}.py  # (the run did not record its overrides)"
    ranks = launch.get("world_size", 1)
    return " ".join(["deepspeed", *(["--num_gpus", str(ranks)] if ranks > 1 else []), *launch["argv"]])


def model_card(plan: Plan, repo_id: str, license: str = "other", datasets: list[str] | None = None):
    """The `huggingface_hub.ModelCard` for a planned push: YAML metadata (base models that
    are Hub ids, `library_name: peft`, pipeline tag, tags, datasets, license, the run's
    metrics as a model-index) and a body with the load line, the training command and
    config, the hyperparameters and the evaluation table."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    settings, metrics = plan.settings, plan.metrics
    recipe = settings["recipe"]
    family = family_of(recipe)
    sources = settings["sources"]
    cfg = settings.get("config", {})
    qlora = bool(settings.get("qlora") or cfg.get("model", {}).get("qlora"))
    trainable = settings.get("trainable") or cfg.get("model", {}).get("trainable") or {}
    lora_used = "lora" in trainable.values()
    data = ModelCardData(
        base_model=[s for s in sources.values() if is_hub_id(s)] or None, library_name="peft",
        pipeline_tag=family.pipeline_tag, license=license, datasets=datasets or None, model_name=repo_id,
        tags=["mmpeft", family.name, recipe, *(["qlora" if qlora else "lora"] if lora_used else [])],
        eval_results=_eval_results(family, recipe, metrics, settings) or None)
    rows = [f"| {part} | `{source}`{'' if is_hub_id(source) else ' (a local folder at training time)'} |"
            for part, source in sources.items()]
    training = cfg.get("training", {})
    hyper = {k: training[k] for k in ("max_steps", "micro_batch_size", "grad_accum", "lr", "lr_by_part",
                                      "weight_decay", "warmup_ratio", "bf16", "ds_config") if k in training}
    lora = cfg.get("model", {}).get("lora")
    if lora_used and isinstance(lora, dict):
        hyper.update({f"lora_{k}": v for k, v in lora.items() if k in ("r", "alpha", "dropout", "targets")})
    hyper.update(trainable=trainable, qlora=qlora)
    figures = [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)]
    figures += [f"| {k} | {v} |" for k, v in metrics.items() if isinstance(v, int) and not isinstance(v, bool)]
    body = "\n".join([
        f"# {repo_id}", "",
        f"{family.description[0].upper() + family.description[1:]}, trained with mmpeft's `{recipe}` recipe. "
        "This repository holds only what training changed; the base "
        "models load from their own sources.", "",
        "## Load", "", "```python", "import mmpeft", "", f'loaded = mmpeft.load("{repo_id}")',
        "# loaded.model, loaded.processor, loaded.settings (and loaded.pipeline for Stable Diffusion)", "```", "",
        "Base models that were local folders at training time are given with `mmpeft.load(..., lm=PATH, clip=PATH"
        + (", diffusion=PATH" if "diffusion" in sources else "") + ")`.", "",
        "## Base models", "", "| part | source |", "| --- | --- |", *rows, "",
        "## Training", "", "```bash", launch_command(settings), "```", "",
        "| hyperparameter | value |", "| --- | --- |", *[f"| {k} | `{json.dumps(v)}` |" for k, v in hyper.items()], "",
        "<details><summary>Full config</summary>", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(),
        "```", "", "</details>", "",
        "## Evaluation", "", *(["| figure | value |", "| --- | --- |", *figures] if figures
                               else ["No evaluation was recorded for this folder (a checkpoint)."]), "",
        "## Files", "", "| file | bytes |", "| --- | --- |", *[f"| `{f}` | {n} |" for f, n in plan.files], "",
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def commit_operations(plan: Plan, card) -> list:
    """The commit's operations: each planned file added from the folder, and the card."""
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(plan.folder / rel)) for rel, _ in plan.files]
    return operations + [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode())]


def check_push_ready(repo_id: str, token: str | None = None) -> None:
    """Fail before training, not after it, when a push at the end could not start: a
    malformed repo id or no token."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise PushError("--push_to_hub needs --hub_model_id user/name")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"--hub_model_id {repo_id!r} is not a valid repo id: {e}") from e
    if not (token or get_token()):
        raise PushError("--push_to_hub needs a Hugging Face token: set HF_TOKEN or log in with `hf auth login`")


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         license: str = "other", datasets: list[str] | None = None, dry_run: bool = False,
         token: str | None = None, endpoint: str | None = None, log=print) -> str | None:
    """Push a run folder to `repo_id` in one commit and return the commit's URL; with
    `dry_run`, only print what would go up. The token comes from `token`, else `HF_TOKEN`
    or the login cache. Errors (no token, a repo owned by another account, the network)
    raise `PushError`; the folder is never written, so the push can simply be rerun."""
    from huggingface_hub import HfApi, get_token

    plan = plan_push(folder)
    card = model_card(plan, repo_id, license, datasets)
    log(f"{'would push' if dry_run else 'pushing'} {len(plan.files) + 1} files from {plan.folder} to {repo_id}"
        + (f"@{revision}" if revision else ""))
    for rel, size in [*plan.files, ("README.md", len(str(card).encode()))]:
        log(f"  {size:>12,d}  {rel}")
    for rel, why in plan.left_out:
        log(f"  {'left out':>12}  {rel}  ({why})")
    if dry_run:
        return None
    retry = f"the local folder {plan.folder} is untouched; run the push again to retry"
    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`, then push again")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        user = api.whoami()
    except Exception as e:  # the network or the Hub: nothing has been sent
        raise PushError(f"could not reach the Hub at {api.endpoint} to check the token ({type(e).__name__}: {e}); "
                        f"{retry}") from e
    owners = {user["name"], *(org["name"] for org in user.get("orgs", []))}
    namespace = repo_id.split("/")[0] if "/" in repo_id else user["name"]
    if namespace not in owners:
        raise PushError(f"{repo_id} belongs to '{namespace}', but the token is for '{user['name']}' (may write to: "
                        f"{', '.join(sorted(owners))}); choose a repo id under one of those")
    operations = commit_operations(plan, card)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(url.repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(url.repo_id, operations, revision=revision,
                                   commit_message=f"mmpeft: {plan.settings['recipe']} run from {plan.folder.name}")
    except Exception as e:
        raise PushError(f"push to {repo_id} failed ({type(e).__name__}: {e}); {retry}") from e
    log(f"pushed: {commit.commit_url}")
    return commit.commit_url
