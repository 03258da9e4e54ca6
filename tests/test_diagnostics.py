"""Diagnostics: within-prompt diversity, KL to the base weights along trajectories, the reward-hacking flag, in a
run's metrics and in the leaderboard's columns."""

from __future__ import annotations

import json
import math

import pytest
import torch

from agents.config import TrainConfig
from agents.diagnostics import hacking_flag, trajectory_kl, within_prompt_diversity
from agents.trainer import Trainer
from diffusion_env.step_math import step_log_prob


def test_diversity_is_the_mean_rms_distance_within_each_prompt():
    img = lambda v: torch.full((3, 2, 2), float(v))  # noqa: E731
    images = torch.stack([img(0), img(1), img(0), img(0.5), img(0.5), img(0.9)])
    prompts = ["a", "a", "b", "b", "b", "alone"]
    # a: one pair at distance 1; b: pairs 0.5, 0.5, 0; "alone" has no pair and is left out
    assert within_prompt_diversity(images, prompts) == pytest.approx((1.0 + 1.0 / 3) / 2, abs=1e-6)
    assert within_prompt_diversity(images[:2], ["x", "y"]) is None
    with pytest.raises(ValueError, match="one prompt per image"):
        within_prompt_diversity(images, prompts[:3])


def test_hacking_flag_needs_a_reward_rise_and_a_collapse():
    assert hacking_flag(2.0, 1.0, [(0.4, 1.0)]) is True  # reward up, diversity below half
    assert hacking_flag(2.0, 1.0, [(0.6, 1.0)]) is False  # reward up, diversity kept
    assert hacking_flag(0.5, 1.0, [(0.1, 1.0)]) is False  # collapse without a reward rise: not hacking
    assert hacking_flag(-1.0, -1.1, [(0.9, 1.0), (0.1, 0.5)]) is True  # any signal (fidelity) counts
    assert hacking_flag(2.0, 1.0, [(None, 1.0), (0.3, None)]) is None  # nothing to judge by


def _cfg(tiny_sd, run_dir, **kw) -> TrainConfig:
    base = dict(env_id="Denoise-SD14-Incompressibility-v0", algo="ddpo-is", num_epochs=2, samples_per_epoch=4,
                sample_batch_size=4, samples_per_prompt=2, train_batch_size=4, micro_batch_size=16, num_steps=2,
                learning_rate=3e-2, env_kwargs=dict(model=str(tiny_sd), height=16, width=16,
                                                    prompts=["a cat", "a dog", "a red circle"]),
                run_dir=str(run_dir), progress=False, num_eval_prompts=1, diagnostic_samples=2)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_run_metrics_carry_kl_to_the_base_weights_diversity_and_the_flag(tiny_sd, tmp_path):
    with Trainer(_cfg(tiny_sd, tmp_path / "run")) as trainer:
        history = trainer.train()
        assert history[0]["charts/kl_ref"] == 0.0  # the first epoch samples with the base weights
        assert history[1]["charts/kl_ref"] > 0.0  # after one update the policy moved
        for h in history:
            assert 0.0 < h["charts/diversity"] < 1.0  # two samples per prompt, never identical
            assert h["charts/reward_hacking"] in (0, 1)
        # The KL is the closed form of two Gaussians with one σ: at a = μ_θ, log π_θ(a) − log π_ref(a) equals
        # ‖μ_θ − μ_ref‖² / (2σ²) exactly; checked with the log-density, independently of gaussian_kl.
        rollout = trainer.collect(trainer.epoch)
        n, S = 2, rollout.num_steps
        x_t = rollout.latents[:n, :S].reshape(n * S, *rollout.latents.shape[2:])
        t = rollout.timesteps[:n].reshape(-1)
        prompts = [p for p in rollout.prompts[:n] for _ in range(S)]
        with torch.no_grad():
            ours = trainer.policy.distribution(x_t, t, prompts)
            ref = trainer.diag_reference.distribution(x_t, t, prompts)
        expected = (step_log_prob(ours.mean, ours.mean, ours.std, "sum")
                    - step_log_prob(ours.mean, ref.mean, ref.std, "sum")).mean()  # fmt: skip
        assert trajectory_kl(trainer.policy, trainer.diag_reference, rollout, n) == pytest.approx(float(expected),
                                                                                               rel=1e-4)  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["charts/kl_ref"] for x in lines] == [h["charts/kl_ref"] for h in history]


def test_diagnostics_off_keeps_no_reference_and_logs_no_kl(tiny_sd, tmp_path):
    with Trainer(_cfg(tiny_sd, tmp_path / "run", diagnostic_samples=0, num_epochs=1)) as trainer:
        history = trainer.train()
        assert trainer.diag_reference is None
    assert "charts/kl_ref" not in history[0] and "charts/diversity" in history[0]
    with pytest.raises(ValueError, match="diagnostic_samples=-1"):
        _cfg(tiny_sd, tmp_path / "x", diagnostic_samples=-1).validate()


def test_diagnostics_do_not_change_what_a_run_learns(tiny_sd, tmp_path):
    weights = []
    for k, n in enumerate((0, 2)):
        with Trainer(_cfg(tiny_sd, tmp_path / f"run{k}", diagnostic_samples=n)) as trainer:
            trainer.train()
            weights.append({k: v.clone() for k, v in trainer.trainable_state().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_leaderboard_hacking_column_from_a_run_and_its_base():
    from benchmarks.leaderboard import hacking

    base = {"train_eval": -1.0, "fidelity": 0.4, "diversity": 0.2}
    assert hacking({"train_eval": -0.9, "fidelity": 0.1, "diversity": 0.2}, base) == 1.0
    assert hacking({"train_eval": -0.9, "fidelity": 0.3, "diversity": 0.15}, base) == 0.0
    assert hacking({"train_eval": -1.2, "fidelity": 0.0, "diversity": 0.0}, base) == 0.0
    assert hacking({"train_eval": -0.9}, {"train_eval": -1.0}) is None
    assert hacking({"train_eval": None}, base) is None


def test_evaluate_diversity_is_fixed_by_its_seed(tiny_sd, tmp_path):
    from agents.evaluate import evaluate_diversity

    with Trainer(_cfg(tiny_sd, tmp_path / "run", num_epochs=1, diagnostic_samples=0)) as trainer:
        cfg, policy = trainer.cfg, trainer.policy
        a = evaluate_diversity(cfg, policy, num_prompts=3, per_prompt=2)  # 3 prompts: two batches, one padded
        b = evaluate_diversity(cfg, policy, num_prompts=3, per_prompt=2)
        c = evaluate_diversity(cfg, policy, num_prompts=3, per_prompt=2, seed=1)
    assert a == b and math.isfinite(a) and a > 0 and c != a
    with pytest.raises(ValueError, match="per_prompt=1"):
        evaluate_diversity(cfg, policy, num_prompts=3, per_prompt=1)


def test_world_fidelity_reads_true_renders_and_skips_other_prompts(tiny_sd, tmp_path):
    from agents.diagnostics import world_fidelity
    from benchmarks.geneval_ceiling import scenes

    images, prompts, _ = scenes("train", 8, seed=5)
    assert world_fidelity(images, prompts) == 1.0
    assert world_fidelity(torch.zeros_like(images), prompts) == 0.0
    assert world_fidelity(images[:2], ["a cat", "a dog"]) is None
    # In a run: logged for tiny-world prompts, and only checked once for others.
    world = dict(model=str(tiny_sd), height=16, width=16, prompts=["a red circle", "a blue square"])
    with Trainer(_cfg(tiny_sd, tmp_path / "w", num_epochs=1, env_kwargs=world)) as trainer:
        assert 0.0 <= trainer.train()[0]["charts/fidelity"] <= 1.0
    with Trainer(_cfg(tiny_sd, tmp_path / "o", num_epochs=2)) as trainer:
        history = trainer.train()
        assert trainer._world_prompts is False and all("charts/fidelity" not in h for h in history)


def test_carry_over_keeps_pairs_not_redone(tmp_path):
    """--carry-over: a planned pair drops its old runs; with --existing-only only once a run of it finished here."""
    import argparse

    from benchmarks.leaderboard import carried_runs

    old = {"runs": [{"task": t, "algo": a, "seed": s} for t in ("T1", "T2") for a in ("a", "b") for s in (0, 1)]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    args = argparse.Namespace(carry_over=path, tasks=["T1"], algos=["a"], existing_only=False)
    kept = {(r["task"], r["algo"]) for r in carried_runs(args)}
    assert kept == {("T1", "b"), ("T2", "a"), ("T2", "b")}
    args.existing_only, args.tasks, args.algos = True, ["T1", "T2"], ["a", "b"]
    done_here = [{"task": "T2", "algo": "b", "seed": 0}]
    kept = {(r["task"], r["algo"]) for r in carried_runs(args, done_here)}
    assert kept == {("T1", "a"), ("T1", "b"), ("T2", "a")}
    assert all(r["carried_over"] == str(path) for r in carried_runs(args, done_here))
