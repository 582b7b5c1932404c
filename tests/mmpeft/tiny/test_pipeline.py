import json
from pathlib import Path

import pytest

from mmpeft.tiny import pipeline


def _fake_runs(monkeypatch, metrics) -> list:
    """Record each command the pipeline runs; each recipe "writes" `metrics` (or
    `metrics(seed)` when callable), data_gen its summary."""
    commands = []

    def run(module, args, env=None):
        cmd = ["python", "-m", module, *args]
        commands.append(cmd)
        if "--output" in cmd:
            data = Path(cmd[cmd.index("--output") + 1])
            data.parent.mkdir(parents=True)
            data.with_name(data.name + ".summary.json").write_text(json.dumps(
                {"jobs": 12, "records": 10, "rejected": {"too short": 2}, "tokens": 100, "seconds": 4}))
        else:
            out = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("training.output_dir=")))
            out.mkdir(parents=True)
            seed = next((int(a.split("=", 1)[1]) for a in cmd if a.startswith("training.seed=")), None)
            (out / "metrics.json").write_text(json.dumps(metrics(seed) if callable(metrics) else metrics))

    monkeypatch.setattr(pipeline, "_run", run)
    return commands


def test_connectors_compare_every_connector_at_the_same_stage_2_length(tmp_path, monkeypatch):
    commands = _fake_runs(monkeypatch, {"answer_accuracy_after": 0.5, "chance": 0.34})
    rows = pipeline.run_connectors(tmp_path / "runs", tmp_path / "cache")
    runs = [runs for _, _, runs in pipeline.CONNECTORS]
    assert len(commands) == sum(map(len, runs))
    k = 0
    for stages in runs:
        for i, (recipe, config, _) in enumerate(stages):
            cmd = commands[k]
            assert cmd[1:3] == ["-m", f"mmpeft.recipes.{recipe}"] and cmd[cmd.index("--config") + 1] == config
            steps = [a for a in cmd if a.startswith("training.max_steps=")]
            # the last stage of each trains the same number of steps, whatever its config's default
            assert steps == (["training.max_steps=1000"] if i == len(stages) - 1 else [])
            k += 1
    assert [r[0] for r in rows] == [name for name, _, _ in pipeline.CONNECTORS]
    assert rows[0][2] == 0.5 and rows[0][3] == "chance 0.340, mlp2x_gelu 0.500"


METRICS = {"first_loss": 2.0, "last_loss": 0.5, "loss": 0.5, "answer_accuracy_before": 0.3,
           "answer_accuracy_after": 0.6, "chance": 0.34, "heldout_diffusion_loss_right": 0.1,
           "heldout_diffusion_loss_shuffled": 0.2, "heldout_diffusion_loss_gap": 0.1,
           "heldout_diffusion_loss_gap_se": 0.01, "stories": 4, "voken_emission_where_image": 1.0,
           "voken_emission_where_text": 0.3, "told_share": 0.5, "told_word_f1": 0.4,
           "told_word_f1_shuffled": 0.2, "diffusion_loss_right": 0.1, "diffusion_loss_shuffled": 0.2,
           "diffusion_loss_gap": 0.1, "diffusion_loss_gap_se": 0.01, "clip_image_similarity": 0.2,
           "clip_image_similarity_shuffled": 0.0, "clip_image_similarity_sd_caption": 0.25,
           "clip_text_similarity_guided": 0.15, "clip_text_similarity_unguided": 0.1, "images": 30,
           "recall_at_1": 0.2, "recall_at_5": 0.5, "clip_text_recall_at_1": 0.6, "clip_text_recall_at_5": 0.9,
           "chance_at_1": 0.03, "chance_at_5": 0.17, "generated": 8, "decision_accuracy": 1.0,
           "decision_majority": 0.5, "story_stories": 2, "story_captions_images_clip_image_similarity": 0.2,
           "story_captions_clip_image_similarity": 0.1, "story_captions_images_recall_at_1": 0.5,
           "story_captions_recall_at_1": 0.5}


def test_pipeline_runs_recipes_as_modules_and_writes_its_figures(tmp_path, monkeypatch):
    metrics = METRICS
    commands = _fake_runs(monkeypatch, metrics)
    out = tmp_path / "runs"
    rows = pipeline.run_recipes(out, tmp_path / "cache")
    assert [c[2] for c in commands] == ["mmpeft.data_gen.make_llava_instruct",
                                        *[f"mmpeft.recipes.{r}" for r, _, _ in pipeline.RECIPES]]
    assert f"fixture.cache={tmp_path / 'cache'}" in commands[1]
    assert rows[0] == ("data_gen", "LLaVA records written of 12 asked (SmolLM2-135M teacher)", 10,
                       "rejected replies 2, 25.0 tokens/s")
    names = {r[0] for r in rows}
    assert names == {"data_gen", *[name for _, name, _ in pipeline.RECIPES]}
    assert ("llava_finetune_tiny", "answer accuracy on held-out questions", 0.6,
            "before training 0.300, chance 0.340") in rows

    (out / "llava_finetune_tiny" / "training.png").write_bytes(b"png")
    (out / "minigpt5_stage2_tiny" / "samples").mkdir()
    (out / "minigpt5_stage2_tiny" / "samples" / "index.html").write_text("<p>stories</p>")
    written_json, written_md, report = pipeline.write_figures(out, {pipeline.RECIPES_TITLE: rows}, 125.0)
    html = report.read_text()  # every table row, each run's plot and sample page, relative links
    assert html.count("<tr><td>") == len(rows) and "<td class=v>0.600</td>" in html
    assert "<img src='llava_finetune_tiny/training.png'" in html
    assert "<a href='minigpt5_stage2_tiny/samples/index.html'>" in html
    assert html.count("<h3>") == len(pipeline.RECIPES)
    record = json.loads(written_json.read_text())
    assert record["seconds"] == 125.0 and record["machine"]["cpus"] >= 1
    assert [r["part"] for r in record["tables"][pipeline.RECIPES_TITLE]] == [r[0] for r in rows]
    page = written_md.read_text()
    assert "2.1 minutes" in page and "llava_finetune_tiny answer accuracy on held-out questions" in " ".join(
        page.split())
    assert "   0.600   (before training 0.300, chance 0.340)" in page


def test_recipe_seeds_run_every_recipe_per_seed_and_give_each_figures_mean_and_spread(tmp_path, monkeypatch):
    commands = _fake_runs(monkeypatch, lambda seed: {**METRICS, "recall_at_1": 0.1 * (seed + 1)})
    out = tmp_path / "runs"
    rows = pipeline.run_recipes(out, tmp_path / "cache", seeds=[0, 1, 2])
    assert [c[2] for c in commands] == ["mmpeft.data_gen.make_llava_instruct",
                                        *[f"mmpeft.recipes.{r}" for _ in range(3) for r, _, _ in pipeline.RECIPES]]
    for seed in range(3):  # each seed's chain builds on its own earlier runs
        chain = commands[1 + seed * len(pipeline.RECIPES): 1 + (seed + 1) * len(pipeline.RECIPES)]
        assert all(f"training.seed={seed}" in c for c in chain)
        assert all(a.startswith(str(out / f"seed{seed}")) for c in chain for a in (
            x.split("=", 1)[1] for x in c if x.startswith(("training.output_dir=", "model.init_")))), chain
    recall = next(r for r in rows if r[1].startswith("text-to-image recall@1"))
    assert abs(recall[2] - 0.2) < 1e-9
    assert recall[3].startswith("seeds 0, 1, 2: 0.100, 0.200, 0.300; spread 0.200; seed 0: ")
    assert len([r for r in rows if r[0] == "data_gen"]) == 1  # data_gen runs once
    by_seed = json.loads((out / "figures_by_seed.json").read_text())
    assert sorted(by_seed) == ["0", "1", "2"] and len(by_seed["0"]) == len(rows) - 1
    (out / "seed1" / "gill_tiny" / "training.png").write_bytes(b"png")
    html = pipeline.write_figures(out, {pipeline.SEEDS_TITLE.format(n=3): rows}, 10.0)[2].read_text()
    assert html.count("<h3>") == 3 * len(pipeline.RECIPES) and "<img src='seed1/gill_tiny/training.png'" in html


def test_seed_runs_that_disagree_on_their_rows_are_an_error():
    with pytest.raises(ValueError, match="row 0"):
        pipeline.spread_rows({0: [("a", "x", 1.0, "")], 1: [("a", "y", 1.0, "")]})
