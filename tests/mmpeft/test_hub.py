"""Pushing a run: the files chosen, the model card, and the errors, all without the Hub
(a local stand-in answers where a test needs an endpoint)."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from mmpeft.hub import PushError, check_push_ready, commit_operations, model_card, plan_push, push

SETTINGS = {"recipe": "llava_finetune", "sources": {"lm": "lmsys/vicuna-7b-v1.5", "clip": "/models/clip-local"},
            "trainable": {"vision": "frozen", "connector": "full", "llm": "lora"}, "qlora": True,
            "launch": {"argv": ["recipes/llava_finetune.py", "training.max_steps=10"], "world_size": 2},
            "config": {"model": {"qlora": True, "lora": {"r": 8, "alpha": 16, "dropout": 0.05}},
                       "training": {"max_steps": 10, "lr": 2.0e-4, "micro_batch_size": 4},
                       "eval": {"questions": "{world}/eval/test_qa.jsonl"}}}


@pytest.fixture
def run(tmp_path):
    """A run folder as the LLaVA recipe lays it out, with a checkpoint and DeepSpeed state."""
    out = tmp_path / "run"
    for folder in (out, out / "checkpoint-2"):
        (folder / "llava_adapter").mkdir(parents=True)
        save_file({"w": torch.ones(2)}, folder / "connector.safetensors")
        save_file({"w": torch.ones(3)}, folder / "llava_adapter" / "adapter_model.safetensors")
        (folder / "llava_adapter" / "adapter_config.json").write_text("{}")
        (folder / "tokenizer.json").write_text("{}")
        (folder / "chat_template.jinja").write_text("{{ messages }}")
        (folder / "mmpeft_config.json").write_text(json.dumps(SETTINGS))
    (out / "checkpoint-2" / "ds").mkdir()
    (out / "checkpoint-2" / "ds" / "state.pt").write_bytes(b"x")
    (out / "checkpoint-2" / "rng_rank0.pt").write_bytes(b"x")
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "runs" / "run").mkdir(parents=True)
    (out / "runs" / "run" / "events.out.tfevents.1.host").write_bytes(b"x")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.5}\n')
    (out / "training.png").write_bytes(b"x")
    (out / "rng_rank0.pt").write_bytes(b"x")
    (out / "metrics.json").write_text(json.dumps({"answer_accuracy_after": 0.5, "answer_accuracy_before": 0.25,
                                                  "first_loss": 1.5, "last_loss": 0.4, "skipped": {}}))
    return out


@pytest.fixture
def online(monkeypatch):
    """The tests run with HF_HUB_OFFLINE set; these talk to a local address instead."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_commit_holds_the_trained_files_and_the_card_and_nothing_else(run):
    plan = plan_push(run)
    ops = commit_operations(plan, model_card(plan, "alice/tiny-llava"))
    assert [op.path_in_repo for op in ops] == [
        "chat_template.jinja", "connector.safetensors", "llava_adapter/adapter_config.json",
        "llava_adapter/adapter_model.safetensors", "metrics.json", "metrics.jsonl", "mmpeft_config.json",
        "runs/run/events.out.tfevents.1.host", "tokenizer.json", "training.png", "README.md"]
    assert plan.left_out == [("rng_rank0.pt", "not a safetensors, JSON, tokenizer, log or plot file"),
                             ("checkpoint-2/", "checkpoint (push its own folder to share it); 9 files")]
    # a checkpoint pushes its own files, but never its engine state
    ckpt = plan_push(run / "checkpoint-2")
    assert {rel for rel, _ in ckpt.left_out} == {"ds/", "rng_rank0.pt", "trainer_state.json"}
    assert dict(plan.files)["connector.safetensors"] == (run / "connector.safetensors").stat().st_size


def test_the_card_parses_back_with_base_models_metrics_and_the_command(run):
    card = ModelCard(str(model_card(plan_push(run), "alice/tiny-llava", license="apache-2.0",
                                    datasets=["liuhaotian/LLaVA-Instruct-150K"])))
    data = card.data
    assert data.base_model == ["lmsys/vicuna-7b-v1.5"]  # the local CLIP folder is named in the body only
    assert (data.library_name, data.pipeline_tag, data.license) == ("peft", "image-text-to-text", "apache-2.0")
    assert data.datasets == ["liuhaotian/LLaVA-Instruct-150K"]
    assert set(data.tags) == {"mmpeft", "llava", "llava_finetune", "qlora"}
    [result] = data.eval_results
    assert (result.metric_type, result.metric_value, result.task_type) == ("accuracy", 0.5, "visual-question-answering")
    assert "deepspeed --num_gpus 2 recipes/llava_finetune.py training.max_steps=10" in card.text
    assert 'mmpeft.load("alice/tiny-llava")' in card.text
    assert "`/models/clip-local` (a local folder at training time)" in card.text
    assert "| lora_r | `8` |" in card.text and "| lr | `0.0002` |" in card.text
    assert "| answer_accuracy_after | 0.5000 |" in card.text


def test_dry_run_lists_every_file_with_its_size_and_contacts_nothing(run, capsys):
    assert push(run, "alice/tiny-llava", dry_run=True, endpoint="http://127.0.0.1:9") is None
    out = capsys.readouterr().out
    assert "would push 11 files" in out
    size = (run / "connector.safetensors").stat().st_size
    assert f"{size:>12,d}  connector.safetensors" in out
    assert "left out  checkpoint-2/  (checkpoint (push its own folder to share it); 9 files)" in out


def test_no_token_is_a_clear_error_before_training_and_at_push(run, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(PushError, match="no Hugging Face token"):
        push(run, "alice/tiny-llava")
    with pytest.raises(PushError, match="needs a Hugging Face token"):
        check_push_ready("alice/tiny-llava")
    with pytest.raises(PushError, match="needs --hub_model_id"):
        check_push_ready("")
    with pytest.raises(PushError, match="not a valid repo id"):
        check_push_ready("alice/tiny llava", token="hf_x")


def test_an_unreachable_hub_is_a_clear_error_and_leaves_the_folder_as_it_was(run, online):
    before = _digest(run)
    with pytest.raises(PushError, match="could not reach the Hub at http://127.0.0.1:9 .*ConnectError.*untouched"):
        push(run, "alice/tiny-llava", token="hf_x", endpoint="http://127.0.0.1:9")
    assert _digest(run) == before


class _WhoAmI(BaseHTTPRequestHandler):
    """Answers the token check as the Hub does; any other request fails the test."""

    requests = []

    def do_GET(self):  # noqa: N802 (the handler's name is fixed)
        self.requests.append(self.path)
        body = json.dumps({"type": "user", "name": "alice", "orgs": [{"name": "alice-lab"}]}).encode()
        self.send_response(200 if self.path == "/api/whoami-v2" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_repo_of_another_account_is_refused_before_anything_is_sent(run, online):
    server = HTTPServer(("127.0.0.1", 0), _WhoAmI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(PushError, match="belongs to 'bob', but the token is for 'alice'.*alice, alice-lab"):
            push(run, "bob/tiny-llava", token="hf_x", endpoint=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert _WhoAmI.requests == ["/api/whoami-v2"]


def test_the_push_command_and_a_recipe_flag_say_what_is_wrong(run, monkeypatch, tmp_path, capsys):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mmpeft.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["push", str(run), "--repo-id", "alice/tiny-llava", "--dry-run"]) == 0
    assert "would push 11 files" in capsys.readouterr().out
    assert main(["push", str(run), "--repo-id", "alice/tiny-llava"]) == 1
    assert "mmpeft push: no Hugging Face token" in capsys.readouterr().err
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, str(root / "recipes" / "llava_pretrain.py"), "--push_to_hub",
                           "--hub_model_id", "alice/tiny-llava", f"training.output_dir={out}"],
                          cwd=root, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode != 0 and "--push_to_hub needs a Hugging Face token" in proc.stderr
    assert not out.exists()  # it stopped before training
