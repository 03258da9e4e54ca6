"""benchmarks/geneval_showcase.py: the all-correct curve of Tiny-GenEval runs, on a short run of the shipped tiny model."""

from __future__ import annotations

import json

import pytest

from agents.config import TrainConfig
from agents.trainer import Trainer


@pytest.fixture(scope="module")
def still_run(tmp_path_factory):
    """Two epochs of GRPO on Denoise-Tiny-GenEval-v0 at a learning rate too small to change a weight in fp32:
    its checkpoints hold the base model's weights."""
    run = tmp_path_factory.mktemp("geneval") / "run"
    cfg = TrainConfig(env_id="Denoise-Tiny-GenEval-v0", algo="grpo", num_epochs=2, samples_per_epoch=4,
                      sample_batch_size=4, samples_per_prompt=2, train_batch_size=4, micro_batch_size=16,
                      num_steps=10, learning_rate=1e-30, adam_weight_decay=0.0, run_dir=str(run), progress=False,
                      num_eval_prompts=1, diagnostic_samples=0, save_every=1, threads=1)  # fmt: skip
    with Trainer(cfg) as trainer:
        trainer.train()
    return run


def test_checkpoints_are_scored_at_the_base_models_prompts_and_seeds(still_run, tmp_path):
    from benchmarks.geneval_showcase import main

    metrics = (still_run / "metrics.jsonl").read_text()
    out = main([str(still_run), "--samples", "8", "--out", str(tmp_path / "out")])
    assert (still_run / "metrics.jsonl").read_text() == metrics  # read-only: an early checkpoint keeps later epochs
    base, points = out["base"], out["runs"][0]["points"]
    assert [p["reward_queries"] for p in points] == [4, 8]  # epochs × samples per epoch
    for split in ("train", "heldout"):
        assert base[split]["n"] == 8
        for p in points:  # unchanged weights, same prompts and noise: the same images, so the same figures
            assert p[split]["all_correct"] == base[split]["all_correct"]
            assert p[split]["reward"] == pytest.approx(base[split]["reward"], abs=1e-6)
            assert p[split]["checks"] == pytest.approx(base[split]["checks"], abs=1e-6)
    assert 0.0 <= base["train"]["reward"] <= 1.0 and base["train"]["reward"] > 0  # ten steps draw shapes
    assert points[-1]["diversity"] == pytest.approx(base["diversity"], rel=1e-5) and base["diversity"] > 0
    assert points[0]["diversity"] is None  # only the final checkpoint's is measured
    grid = json.loads((tmp_path / "out" / "grid_before_after.json").read_text())
    assert len(grid["prompts"]) == 8 * 8 and grid["layout"]["nrow"] == 8  # 8 prompts, 4 before + 4 after each
    assert (tmp_path / "out" / "curve.png").stat().st_size > 0
    # A rerun reads each checkpoint's figures from its cache instead of sampling again.
    cache = still_run / "geneval_eval" / f"{points[0]['checkpoint']}.json"
    data = json.loads(cache.read_text())
    data["train"]["all_correct"] = 2.0  # a value no evaluation gives
    cache.write_text(json.dumps(data))
    again = main([str(still_run), "--samples", "8", "--out", str(tmp_path / "out"), "--no-grid"])
    assert again["runs"][0]["points"][0]["train"]["all_correct"] == 2.0
    # --relations adds the two-object relation splits to the same caches: only they are sampled.
    rel = main([str(still_run), "--samples", "8", "--out", str(tmp_path / "out"), "--no-grid", "--relations"])
    p0 = rel["runs"][0]["points"][0]
    assert p0["train"]["all_correct"] == 2.0
    for split in ("seen_relations", "heldout_relations"):
        assert rel["base"][split]["n"] == 8 and set(rel["base"][split]["by_count"]) == {"2"}
        assert rel["base"][split]["checks"]["relation"] is not None
        assert p0[split]["all_correct"] == rel["base"][split]["all_correct"]  # unchanged weights, same samples
        assert split in rel["summary"]
    # A cache of other weights (here: another epoch) is not merged with new splits: everything is sampled again.
    data = json.loads(cache.read_text())
    data["epoch"] += 7
    data.pop("heldout_relations")
    cache.write_text(json.dumps(data))
    fresh = main([str(still_run), "--samples", "8", "--out", str(tmp_path / "out"), "--no-grid", "--relations"])
    assert fresh["runs"][0]["points"][0]["train"]["all_correct"] == base["train"]["all_correct"]  # not the 2.0
    # A cache from before the fixed evaluation batch, of a run that sampled in batches of 4: sampled again.
    data = json.loads(cache.read_text())
    data["train"]["all_correct"] = 2.0
    del data["eval_batch"]
    cache.write_text(json.dumps(data))
    again = main([str(still_run), "--samples", "8", "--out", str(tmp_path / "out"), "--no-grid"])
    assert again["runs"][0]["points"][0]["train"]["all_correct"] == base["train"]["all_correct"]


def test_runs_of_other_tasks_are_refused(tmp_path):
    from benchmarks.geneval_showcase import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TrainConfig(env_id="Denoise-Tiny-Compressibility-v0").to_dict()))
    with pytest.raises(SystemExit, match="expected a Tiny-GenEval task"):
        main([str(run)])
    with pytest.raises(SystemExit, match="no config.json"):
        main([str(tmp_path / "missing")])
