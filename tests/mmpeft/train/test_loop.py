import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mmpeft.train.loop import (
    TrainConfig,
    _mean_over_ranks,
    _optimizer_and_schedule,
    _schedule,
    _tokens_per_micro_batch,
    deepspeed_config,
    param_groups,
)
from mmpeft.train.resume import STATE_FILE, latest_checkpoint, resume_position
from mmpeft.train.sampler import GroupedBatchSampler

CPU = torch.device("cpu")

ROOT = Path(__file__).resolve().parents[3]
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")


def _write(folder: Path, config: dict) -> str:
    path = folder / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def _autos(value) -> list:
    if isinstance(value, dict):
        return [a for v in value.values() for a in _autos(v)]
    return [value] if value == "auto" else []


# --- the DeepSpeed config fill ---


def test_every_auto_is_filled_from_the_training_settings(tmp_path):
    path = _write(tmp_path, {
        "fp16": {"enabled": "auto", "loss_scale": 0}, "bf16": {"enabled": "auto"},
        **dict.fromkeys(OWNED, "auto"),
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto", "overlap_comm": True}})
    cfg = TrainConfig("out", 10, micro_batch_size=3, grad_accum=5, max_grad_norm=0.5, bf16=True, ds_config=path)
    assert deepspeed_config(cfg, world_size=4) == {
        "fp16": {"enabled": False, "loss_scale": 0}, "bf16": {"enabled": True},
        "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 5, "train_batch_size": 60,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
                              "stage3_param_persistence_threshold": 1e5, "overlap_comm": True},
        "steps_per_print": 10**9}


def test_absent_values_are_filled_and_no_file_means_stage_0(tmp_path):
    cfg = TrainConfig("out", 10, micro_batch_size=2, grad_accum=3, max_grad_norm=2.0,
                      ds_config=_write(tmp_path, {"zero_optimization": {"stage": 1}, "steps_per_print": 5}))
    filled = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "train_batch_size": 12,
              "gradient_clipping": 2.0, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    assert deepspeed_config(cfg, world_size=2) == {"zero_optimization": {"stage": 1}, "steps_per_print": 5, **filled}
    cfg.ds_config = None
    assert deepspeed_config(cfg, world_size=2) == {"zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
                                                   **filled}


def test_concrete_values_equal_to_the_training_settings_are_kept(tmp_path):
    concrete = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 16,
                "gradient_clipping": 1, "bf16": {"enabled": True}, "fp16": {"enabled": False},
                "zero_optimization": {"stage": 2}}
    cfg = TrainConfig("out", 10, micro_batch_size=4, grad_accum=2, max_grad_norm=1.0, bf16=True,
                      ds_config=_write(tmp_path, concrete))
    assert deepspeed_config(cfg, world_size=2) == {**concrete, "steps_per_print": 10**9}


def test_every_disagreement_with_the_training_settings_is_reported_at_once(tmp_path):
    path = _write(tmp_path, {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": "auto",
                             "train_batch_size": 64, "gradient_clipping": 1.0, "bf16": {"enabled": True},
                             "fp16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    cfg = TrainConfig("out", 10, micro_batch_size=16, grad_accum=1, max_grad_norm=1.0, bf16=False, ds_config=path)
    with pytest.raises(ValueError) as error:
        deepspeed_config(cfg, world_size=2)
    fix = 'set it to "auto" or make them agree'
    assert str(error.value).splitlines()[1:] == [
        f"{path}: train_micro_batch_size_per_gpu is 8 but training.micro_batch_size is 16; {fix}",
        f"{path}: train_batch_size is 64 but training.micro_batch_size x training.grad_accum x world size is "
        f"16 x 1 x 2 = 32; {fix}",
        f"{path}: bf16.enabled is true but training.bf16 is false; {fix}",
        f"{path}: fp16.enabled is true but training.fp16 is false; {fix}",
    ]


def test_optimizer_and_scheduler_sections_pass_through_untouched(tmp_path):
    # the loop gives DeepSpeed its own AdamW and schedule, which take precedence over these
    sections = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.1}},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}
    cfg = TrainConfig("out", 10, ds_config=_write(tmp_path, {"zero_optimization": {"stage": 2}, **sections}))
    config = deepspeed_config(cfg, world_size=1)
    assert {k: config[k] for k in sections} == sections


@pytest.mark.parametrize("path", DS_CONFIGS, ids=[p.name for p in DS_CONFIGS])
def test_each_repository_ds_config_fills_to_a_config_deepspeed_accepts(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    original = json.loads(path.read_text())
    cfg = TrainConfig("out", 10, micro_batch_size=2, grad_accum=3, max_grad_norm=0.7, ds_config=str(path))
    assert deepspeed_config(cfg, world_size=8)["train_batch_size"] == 48
    config = deepspeed_config(cfg, world_size=1)
    assert _autos(config) == []
    assert {k: config[k] for k in OWNED} == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
                                              "train_batch_size": 6, "gradient_clipping": 0.7}
    assert config["fp16"] == {**original["fp16"], "enabled": False} and config["bf16"] == {"enabled": False}
    zero = original["zero_optimization"]
    assert {k: v for k, v in config["zero_optimization"].items() if zero[k] != "auto"} == {
        k: v for k, v in zero.items() if v != "auto"}
    parsed = DeepSpeedConfig(config)  # outside a process group DeepSpeed checks the batch sizes for one rank
    assert (parsed.train_batch_size, parsed.gradient_accumulation_steps) == (6, 3)
    assert (parsed.zero_optimization_stage, parsed.bfloat16_config.enabled) == (zero["stage"], False)


# --- loss normalisation over the tokens of a step ---


def _labels(row: list[int]) -> dict:
    return {"labels": torch.tensor([row])}


def test_tokens_per_micro_batch_counts_the_predicted_labels_of_the_whole_step():
    # the first label is never predicted (the loss shifts labels by one), so 7 does not count
    micro = [_labels([7, 1, 2, 3, -100, -100]), _labels([-100, 4, 5, 6, 7, 8])]  # 3 and 5 tokens
    tokens = _tokens_per_micro_batch(micro, world=1, device=CPU)
    assert tokens.dtype == torch.float32 and tokens.item() == 4.0


def test_tokens_per_micro_batch_is_none_without_labels_and_never_below_one():
    assert _tokens_per_micro_batch([_labels([1, 2]), {"input_ids": torch.tensor([[1, 2]])}], world=1,
                                   device=CPU) is None
    assert _tokens_per_micro_batch([_labels([1, -100, -100])], world=1, device=CPU).item() == 1.0


def _tiny_lm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 11))


def test_micro_batches_of_3_and_5_tokens_give_the_gradient_of_one_batch_of_8():
    from transformers.loss.loss_utils import ForCausalLMLoss  # the loss that models given num_items_in_batch use

    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    labels = torch.tensor([[-100, 2, 3, 4, -100, -100], [-100, 5, 4, 3, 2, 1]])  # 3 and 5 tokens
    micro = [{"input_ids": ids[k:k + 1], "labels": labels[k:k + 1]} for k in (0, 1)]

    def gradient(loss_of) -> torch.Tensor:
        model = _tiny_lm()
        for batch in micro:
            # DeepSpeed divides each micro-batch's loss by the accumulation steps before backward
            (loss_of(model, batch) / len(micro)).backward()
        return model[1].weight.grad

    tokens = _tokens_per_micro_batch(micro, world=1, device=CPU)
    step = gradient(lambda m, b: ForCausalLMLoss(m(b["input_ids"]), b["labels"], 11, num_items_in_batch=tokens))
    whole = _tiny_lm()
    ForCausalLMLoss(whole(ids), labels, 11).backward()  # the mean over all 8 tokens
    assert torch.allclose(step, whole[1].weight.grad, atol=1e-7)
    per_micro_mean = gradient(lambda m, b: ForCausalLMLoss(m(b["input_ids"]), b["labels"], 11))
    assert not torch.allclose(per_micro_mean, whole[1].weight.grad, atol=1e-4)  # the numbers tell the two apart


_RANK = """
import datetime, json, sys, torch
from mmpeft.train.loop import _mean_over_ranks, _tokens_per_micro_batch
rank, folder = int(sys.argv[1]), sys.argv[2]
torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                                     timeout=datetime.timedelta(seconds=60))
micro = [{"labels": torch.tensor([row])} for row in json.loads(sys.argv[3])]
cpu = torch.device("cpu")
tokens = _tokens_per_micro_batch(micro, world=2, device=cpu)
logged = _mean_over_ranks({"loss": 1.0 + 2 * rank, "other": 4.0 - 4 * rank}, cpu)
json.dump({"tokens": tokens.item(), "logged": logged}, open(f"{folder}/rank{rank}.json", "w"))
torch.distributed.destroy_process_group()
"""


def test_tokens_and_logged_values_are_shared_by_every_rank(tmp_path, two_ranks):
    rows = {0: [[-100, 1, 2, 3], [-100, 1, 2, 3, 4, 5]],  # 3 + 5 tokens: alone, 8 / 2 = 4 per micro-batch
            1: [[-100, 1, -100], [-100, 1, 2, 3]]}  # 1 + 3 tokens: alone, 2
    results = two_ranks(_RANK, lambda r: [json.dumps(rows[r])])
    # 12 tokens over 2 ranks x 2 micro-batches
    assert [r["tokens"] for r in results] == [3.0, 3.0]
    assert [r["logged"] for r in results] == [{"loss": 2.0, "other": 2.0}] * 2


def test_mean_over_ranks_is_the_identity_on_one_process():
    assert _mean_over_ranks({"loss": 0.25, "a": 3.0}, CPU) == {"loss": 0.25, "a": 3.0}


_ONE_RANK = """
import datetime, json, sys, torch
from mmpeft.train.loop import _mean_over_ranks, _tokens_per_micro_batch
rank, folder = int(sys.argv[1]), sys.argv[2]
torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=0, world_size=1,
                                     timeout=datetime.timedelta(seconds=60))
seen = []
reduce = torch.distributed.all_reduce
torch.distributed.all_reduce = lambda t, *a, **k: seen.append(str(t.device)) or reduce(t, *a, **k)
cpu, errors = torch.device("cpu"), []
# tensors made without a device land on the default one: here "meta", standing in for the CPU
# under NCCL; the loop's own tensors must follow the training device it is given
with torch.device("meta"):
    for call in (lambda: _mean_over_ranks({"loss": 1.5}, cpu),
                 lambda: _tokens_per_micro_batch([{"labels": torch.tensor([[1, 2, 3]], device=cpu)}], 1, cpu)):
        try:
            call()
        except RuntimeError as e:
            errors.append(str(e))
json.dump({"seen": seen, "errors": errors}, open(f"{folder}/rank0.json", "w"))
"""


def test_collectives_run_on_the_training_device_with_one_rank_through_the_process_group(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _ONE_RANK, "0", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "rank0.json").read_text())
    assert out == {"seen": ["cpu", "cpu"], "errors": []}  # both reduced, both on the training device


def test_a_collective_on_another_device_is_refused_before_it_starts():
    from mmpeft.train.collectives import all_reduce

    with pytest.raises(RuntimeError, match="collective on a tensor on meta, but the run trains on cpu"):
        all_reduce(torch.zeros(2, device="meta"), CPU)


# --- learning rates ---


def _model() -> nn.Module:
    model = nn.ModuleDict({"connector": nn.Linear(2, 3),
                           "lm": nn.ModuleDict({"lora_A": nn.Linear(3, 3, bias=False), "norm": nn.LayerNorm(3)}),
                           "frozen": nn.Linear(2, 2)})
    model["frozen"].requires_grad_(False)
    return model


def _lrs_per_step(cfg: TrainConfig) -> list[list[float]]:
    """The learning rate of each group at each optimizer step, as DeepSpeed steps the loop's scheduler."""
    optimizer, scheduler = _optimizer_and_schedule(_model(), cfg)
    lrs = []
    for _ in range(cfg.max_steps):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs + [[g["lr"] for g in optimizer.param_groups]]


def test_learning_rate_warms_up_linearly_to_the_peak_then_decays_by_cosine_to_zero():
    lr = [g[0] for g in _lrs_per_step(TrainConfig("out", max_steps=100, lr=1e-3, warmup_ratio=0.1))]
    assert lr[0] == pytest.approx(1e-3 / 11) and lr[9] == pytest.approx(1e-3 * 10 / 11)
    assert max(lr) == lr[10] == pytest.approx(1e-3)
    assert lr[55] == pytest.approx(0.5e-3)  # halfway through the decay
    assert lr[100] == pytest.approx(0.0, abs=1e-12) and lr[99] == pytest.approx(1e-3 * (1 - math.cos(math.pi / 90)) / 2)
    assert all(a < b for a, b in zip(lr[:10], lr[1:11], strict=True))
    assert all(a > b for a, b in zip(lr[10:100], lr[11:101], strict=True))


def test_the_linear_schedule_decays_in_equal_steps_to_zero_and_others_are_refused():
    lr = [g[0] for g in _lrs_per_step(TrainConfig("out", max_steps=20, lr=1e-3, warmup_ratio=0.25,
                                                   schedule="linear"))]
    assert lr[4] == pytest.approx(1e-3 * 5 / 6) and lr[5] == pytest.approx(1e-3)  # the same warmup
    assert lr[5:] == pytest.approx([1e-3 * (1 - k / 15) for k in range(16)])
    with pytest.raises(ValueError, match="training.schedule is 'step'; one of cosine, linear"):
        _schedule(TrainConfig("out", max_steps=10, schedule="step"))


def test_warmup_is_at_least_one_step_and_none_at_ratio_zero():
    short = _schedule(TrainConfig("out", max_steps=10, warmup_ratio=0.03))  # 0.3 steps rounds up to 1
    assert (short(0), short(1)) == (0.5, 1.0)
    assert _schedule(TrainConfig("out", max_steps=10, warmup_ratio=0.0))(0) == 1.0


def test_parameter_groups_take_the_first_matching_part_and_no_decay_for_1d_parameters():
    model = _model()
    cfg = TrainConfig("out", max_steps=20, lr=2e-4, weight_decay=0.1, warmup_ratio=0.2,
                      lr_by_part={"lm": 1e-5, "lora": 5e-4, "connector": 1e-3})
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {(g["lr"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in param_groups(model, cfg)}
    assert groups == {(1e-3, 0.1): ["connector.weight"], (1e-3, 0.0): ["connector.bias"],
                      (1e-5, 0.1): ["lm.lora_A.weight"], (1e-5, 0.0): ["lm.norm.bias", "lm.norm.weight"]}
    lrs = _lrs_per_step(cfg)  # every group follows the same schedule, each from its own peak
    assert lrs[0] == pytest.approx([1e-3 / 5, 1e-3 / 5, 1e-5 / 5, 1e-5 / 5])
    assert lrs[4] == pytest.approx([1e-3, 1e-3, 1e-5, 1e-5])


def test_a_model_with_nothing_trainable_is_an_error():
    with pytest.raises(ValueError, match="no parameter is trainable"):
        param_groups(nn.Linear(2, 2).requires_grad_(False), TrainConfig("out", 10))


# --- resuming ---


def test_latest_checkpoint_is_the_highest_step_with_a_state_file(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (2, 10, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10):  # checkpoint-12 has no state file: its save did not finish
        (tmp_path / f"checkpoint-{step}" / STATE_FILE).write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # by number, not by name ("2" > "10")


def test_a_resumed_run_sees_the_micro_batches_an_uninterrupted_run_would():
    lengths, has_image = list(range(10)), [k % 3 == 0 for k in range(10)]
    accum = 2
    sampler = GroupedBatchSampler(lengths, has_image, micro_batch=2, grad_accum=accum, seed=5)
    per_epoch = len(sampler)
    stream = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        stream.append(list(sampler))
    # 4 images fill one global batch of 4, 6 texts two (2 repeated): 3 optimizer steps per epoch
    assert per_epoch == 6 and all(len(s) == per_epoch for s in stream)
    flat = [mb for epoch in stream for mb in epoch]
    for step in range(3 * per_epoch // accum):
        sampler.set_epoch(*resume_position(step, accum, per_epoch))
        rest, start = list(sampler), step * accum  # the rest of the epoch from the first micro-batch not trained on
        assert rest == flat[start:start + len(rest)] and len(rest) == per_epoch - start % per_epoch, step


def test_adam_betas_reach_the_optimizer_and_bad_ones_are_refused():
    optimizer, _ = _optimizer_and_schedule(_model(), TrainConfig("out", 10, adam_betas=[0.9, 0.95]))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert _optimizer_and_schedule(_model(), TrainConfig("out", 10))[0].param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match=r"training.adam_betas is \[0.9\]; two numbers"):
        _optimizer_and_schedule(_model(), TrainConfig("out", 10, adam_betas=[0.9]))


def test_random_states_round_trip_and_old_checkpoints_still_load():
    from mmpeft.train.resume import rng_states, set_rng_states

    torch.manual_seed(3)
    saved = rng_states()
    assert saved["device_name"] == "cpu" and saved["device"] is None  # no accelerator here
    first = torch.rand(3)
    set_rng_states(saved)
    assert torch.equal(torch.rand(3), first)
    set_rng_states(saved["cpu"])  # a checkpoint from before: the CPU state alone
    assert torch.equal(torch.rand(3), first)


def test_a_checkpoint_resumes_only_on_the_rank_count_that_saved_it(tmp_path):
    from mmpeft.train.resume import check_resume_world

    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 4, "history": [], "world_size": 8}))
    check_resume_world(tmp_path, 8)
    with pytest.raises(ValueError, match=r"was saved by 8 rank\(s\) and this run has 2: resume it with 8 "
                                         r"\(e.g. deepspeed --num_gpus 8"):
        check_resume_world(tmp_path, 2)
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 4, "history": []}))  # older: count the random states
    for rank in range(4):
        (tmp_path / f"rng_rank{rank}.pt").touch()
    with pytest.raises(ValueError, match=r"saved by 4 rank\(s\) and this run has 1"):
        check_resume_world(tmp_path, 1)


def test_fp16_fills_the_config_and_sets_the_load_dtype_and_both_precisions_are_refused(tmp_path):
    from mmpeft.train.loop import training_dtype

    path = ROOT / "ds_configs" / "zero2.json"
    config = deepspeed_config(TrainConfig("out", 10, ds_config=str(path), fp16=True), world_size=1)
    assert config["fp16"]["enabled"] is True and config["bf16"]["enabled"] is False
    assert config["fp16"]["loss_scale"] == 0  # dynamic loss scaling, from the file
    assert [training_dtype(t) for t in ({"bf16": True}, {"fp16": True}, {})] == [
        torch.bfloat16, torch.float16, torch.float32]
    with pytest.raises(ValueError, match="training.bf16 and training.fp16 are both true; choose one"):
        deepspeed_config(TrainConfig("out", 10, ds_config=str(path), fp16=True, bf16=True), world_size=1)
    with pytest.raises(ValueError, match="choose one"):
        training_dtype({"bf16": True, "fp16": True})
