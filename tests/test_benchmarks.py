"""Smoke tests of the benchmarks on a random micro model: structure and consistency of what they write."""

from __future__ import annotations

import json
import math

import pytest
import torch

from agents import registry
from agents.config import preset_config
from agents.core import RolloutBuffer, optimizer_step


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    from diffusion_env.testing import build_random_model

    return build_random_model(tmp_path_factory.mktemp("micro") / "model", size="micro")


def test_random_model_sizes_are_checked(tmp_path):
    from diffusion_env.testing import build_random_model

    with pytest.raises(ValueError, match="expected one of"):
        build_random_model(tmp_path, size="huge")


def test_throughput_quick_reports_consistent_figures(micro_model, tmp_path):
    from benchmarks import throughput

    out = tmp_path / "t.json"
    result = throughput.main(["--quick", "--baseline", "--model", str(micro_model), "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["speedup"] == pytest.approx(result["speedup"])
    assert {"machine", "settings", "peaks", "baseline", "optimised", "targets"} <= set(saved)
    assert saved["machine"]["cpu_cores"] >= 1 and saved["machine"]["torch"] == torch.__version__
    assert saved["peaks"]["fp32_gflops"] > 0 and saved["peaks"]["bf16_gflops"] > 0
    steps, samples = saved["settings"]["num_steps"], saved["settings"]["samples_per_epoch"]
    assert (steps, samples) == (4, 16)
    for name in ("baseline", "optimised"):
        side = saved[name]
        for key in ("epoch_s", "sample_s", "train_s", "unet_pure_s", "ratio_to_unet", "samples_per_s",
                    "gflops_in_pure_unet", "peak_mem_mb", "unet_gflop_per_epoch"):  # fmt: skip
            assert side[key] > 0, (name, key)
        assert sum(side["split"].values()) == pytest.approx(1.0)
        assert side["samples_per_s"] == pytest.approx(samples / side["epoch_s"])
        # The PPO ratio of the first minibatch starts at 1: the old log-probs match the training ones.
        assert max(side["ratio_dev_first"]) < 1e-4
        assert all(e["page_faults"] is None or e["page_faults"] >= 0 for e in side["epochs"])
    # Every UNet call was recorded: sampling (one per step and sample batch) plus training calls.
    base, opt = saved["baseline"], saved["optimised"]
    assert base["unet_calls"] == 2 * steps * samples // 16  # 16-sample batches; one call per timestep
    c = opt["config"]
    train_calls = (
        samples // c["train_batch_size"] * math.ceil(c["train_batch_size"] * steps / c["micro_batch_size"])
    )
    assert opt["unet_calls"] == steps * samples // c["sample_batch_size"] + train_calls
    # Same epoch, same UNet FLOPs whichever way it is batched.
    assert opt["unet_gflop_per_epoch"] == pytest.approx(base["unet_gflop_per_epoch"], rel=1e-6)
    # The optimised side runs with the speed settings a `denoise-gym train --preset tiny` run takes.
    preset = preset_config("tiny", "ddpo-is")
    assert (c["micro_batch_size"], c["attention"], c["channels_last"]) == (
        preset.micro_batch_size, preset.attention, preset.channels_last)
    assert saved["speedup"] == pytest.approx(base["epoch_s"] / opt["epoch_s"])


def test_throughput_bf16_auto_follows_the_measured_matmul_gain():
    from benchmarks.throughput import BF16_AUTO_MIN_GAIN, use_bf16

    assert use_bf16("auto", 300.0, 300.0 * BF16_AUTO_MIN_GAIN)  # AMX CPUs, tensor-core GPUs
    assert not use_bf16("auto", 180.0, 410.0)  # AVX512-BF16 only: bf16 was slower for the tiny UNet
    assert use_bf16("on", 180.0, 100.0) and not use_bf16("off", 1.0, 1e6)
    with pytest.raises(ValueError, match="expected 'auto', 'on' or 'off'"):
        use_bf16("yes", 1.0, 1.0)


@pytest.mark.parametrize("reset_works", [True, False])
def test_peak_memory_sees_a_block_s_allocation(monkeypatch, reset_works):
    from benchmarks.throughput import PeakMemory

    if not reset_works:  # the 5 ms polling fallback
        monkeypatch.setattr(PeakMemory, "_reset_peak_rss", staticmethod(lambda: False))
    before = PeakMemory.rss_mb()
    with PeakMemory("cpu") as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        block.add_(1)
        if not reset_works:
            import time

            time.sleep(0.05)  # let the poller see it
        del block
    assert mem.peak_mb >= before + 60
    if reset_works:  # reset at entry: a second block without allocation does not report the first peak
        with PeakMemory("cpu") as again:
            pass
        assert again.peak_mb < mem.peak_mb - 30


def test_precision_quick_control_is_exact_and_bf16_deviates(micro_model, tmp_path):
    from benchmarks import precision

    control = precision.main(["--quick", "--model", str(micro_model), "--dtype", "fp32", "--lr", "1e-3"])
    step = control["steps"][0]
    assert step["fp32_log_ratio"]["mean_abs"] > 0  # the step moved the policy
    assert step["log_ratio_error"]["max_abs"] == 0.0 and step["sign_agreement"] == 1.0  # same computation twice
    out = tmp_path / "p.json"
    bf16 = precision.main(["--quick", "--model", str(micro_model), "--lr", "1e-5", "1e-3", "--json", str(out)])
    assert [s["lr"] for s in bf16["steps"]] == [1e-5, 1e-3]
    assert bf16["log_prob_dev_at_theta0"]["max"] > 0  # bf16 rounds
    for s in bf16["steps"]:
        assert math.isfinite(s["error_over_signal"]) and 0 <= s["sign_agreement"] <= 1
    assert json.loads(out.read_text())["steps"][1]["lr"] == 1e-3
    with pytest.raises(SystemExit):
        precision.parse_args(["--lr", "0"])


def test_throughput_rejects_bad_options():
    from benchmarks import throughput

    with pytest.raises(SystemExit):
        throughput.parse_args(["--samples", "10"])
    with pytest.raises(SystemExit):
        throughput.parse_args(["--repeats", "0"])


def _plain_reinforce(policy, optimizer, rollout, advantages, cfg, generator, tracker=None):
    S = rollout.num_steps
    s = torch.arange(rollout.num_samples).repeat_interleave(S)
    j = torch.arange(S).repeat(rollout.num_samples)
    batch = RolloutBuffer(rollout, advantages, len(s)).pairs(s, j, advantages[s], len(s))
    (-(batch.advantages * policy.log_prob(batch.obs, batch.actions)).mean()).backward()
    norm, _ = optimizer_step(policy, optimizer, cfg.max_grad_norm)
    return {"losses/grad_norm": norm}


def test_leaderboard_quick_resumes_and_includes_user_algorithms(micro_model, tmp_path):
    from benchmarks import leaderboard

    registry.register_algo("test-reinforce", _plain_reinforce, override=True)
    try:
        argv = ["--quick", "--model", str(micro_model), "--num-steps", "3", "--samples-per-epoch", "8",
                "--budget", "16", "--eval-samples", "4", "--tasks", "Compressibility",
                "--algos", "ddpo-is", "test-reinforce", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]  # fmt: skip
        first = leaderboard.main(argv)
        assert (first["ran"], first["skipped"]) == (2, 0)
        saved = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
        assert saved["complete"] and saved["budget"] == 16
        assert {r["algo"] for r in saved["rows"]} == {"base model", "ddpo-is", "test-reinforce"}
        for run in saved["runs"]:
            assert run["reward_queries"] == 16 and len(run["curve"]) == 2  # 2 epochs of 8 samples
            assert run["kl_to_base"] >= 0 and run["kl_path"] >= run["kl_to_base"]
            for key in ("final_reward", "train_eval", "heldout_eval"):
                assert math.isfinite(run[key])
        base = next(r for r in saved["rows"] if r["algo"] == "base model")
        assert base["kl_to_base"][0] == 0.0  # the base model is its own reference
        assert (tmp_path / "out" / "leaderboard_Compressibility.png").stat().st_size > 0
        assert "test-reinforce" in (tmp_path / "out" / "leaderboard.md").read_text()

        # Finished runs are skipped; a run without its result resumes from its checkpoint.
        again = leaderboard.main(argv)
        assert (again["ran"], again["skipped"]) == (0, 2)
        run_dir = tmp_path / "runs" / "Denoise-Tiny-Compressibility-v0" / "ddpo-is" / "seed0"
        first_s = json.loads((run_dir / "result.json").read_text())["train_s"]
        (run_dir / "result.json").unlink()
        resumed = leaderboard.main(argv)
        assert (resumed["ran"], resumed["skipped"]) == (1, 1)
        redone = json.loads((run_dir / "result.json").read_text())
        assert redone["resumed"] and redone["reward_queries"] == 16
        # Its training time counts the epochs it resumed past (read here from metrics.jsonl), not only its own.
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        epochs_s = sum(r["perf/sample_s"] + r["perf/train_s"] for r in rows)
        assert len(rows) == 2 and redone["resumed_epochs_s"] == pytest.approx(epochs_s)
        assert redone["train_s"] > epochs_s and 0 < epochs_s < first_s
    finally:
        registry._ALGOS.pop("test-reinforce", None)


def test_leaderboard_rejects_unknown_tasks_and_algorithms():
    from benchmarks import leaderboard

    with pytest.raises(SystemExit):
        leaderboard.parse_args(["--tasks", "Nope"])
    with pytest.raises(SystemExit):
        leaderboard.parse_args(["--algos", "not-an-algo"])


# ---------------------------------------------------------------------------------------------- speed-ups
def _rollout_and_policy(tiny_sd, **policy_kwargs):
    from agents.core import collect_rollout
    from agents.policy import GaussianDenoisingPolicy
    from tests.conftest import make_env

    env = make_env(tiny_sd, num_envs=4)
    torch.manual_seed(0)
    policy = GaussianDenoisingPolicy(env.family.load_network(), env.family, **policy_kwargs)
    rollout = collect_rollout(env, policy, seed=3, generator=torch.Generator().manual_seed(4))
    return policy, rollout


def _update(policy, rollout, **cfg_changes):
    from agents import ddpo_is
    from agents.config import TrainConfig
    from agents.core import make_optimizer

    cfg = TrainConfig(samples_per_epoch=4, sample_batch_size=4, train_batch_size=2, micro_batch_size=3,
                      num_inner_epochs=2, learning_rate=1e-3, **cfg_changes)  # fmt: skip
    opt = make_optimizer(policy.trainable_parameters(), cfg)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    metrics = ddpo_is.update(policy, opt, rollout, adv, cfg, torch.Generator().manual_seed(5))
    return metrics, torch.cat([p.detach().flatten() for p in policy.trainable_parameters()])


def test_recompute_old_log_probs_changes_nothing_in_fp32(tiny_sd):
    policy, rollout = _rollout_and_policy(tiny_sd)
    start = {k: v.clone() for k, v in policy.network.state_dict().items()}
    plain, w_plain = _update(policy, rollout)
    policy.network.load_state_dict(start)
    again, w_again = _update(policy, rollout, recompute_old_log_probs=True)
    assert "losses/old_log_prob_dev" not in plain
    assert 0 <= again["losses/old_log_prob_dev"] < 1e-5  # fp32: recomputed = sampled up to rounding
    assert again["losses/optimizer_steps"] == plain["losses/optimizer_steps"] == 4  # same draws, same steps
    torch.testing.assert_close(w_again, w_plain, rtol=0, atol=1e-4)  # an Adam step moves weights ~1e-3


def test_recomputed_old_log_probs_replace_every_stored_one(tiny_sd):
    """Stored log-probs that are off (as bf16 sampling leaves them) are all replaced, in both passes.

    The first optimizer step's pairs are not recomputed ahead: its training forward at the old
    parameters provides them. If they were not kept for the second pass, it would use the stored ones.
    """
    policy, rollout = _rollout_and_policy(tiny_sd)
    start = {k: v.clone() for k, v in policy.network.state_dict().items()}
    calls = []
    unet_eps = policy.forward_network
    policy.forward_network = lambda *a: calls.append(1) or unet_eps(*a)
    _, w_plain = _update(policy, rollout)
    plain_calls = len(calls)
    policy.network.load_state_dict(start)
    calls.clear()
    off = rollout._replace(log_probs=rollout.log_probs + 0.5)
    metrics, w_recomputed = _update(policy, off, recompute_old_log_probs=True)
    assert metrics["losses/old_log_prob_dev"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["losses/ratio_dev_first"] == 0.0
    torch.testing.assert_close(w_recomputed, w_plain, rtol=0, atol=1e-4)
    # 4 samples in steps of 2 x 4 timesteps = 8 pairs in micro-batches of 3: 3 calls per optimizer
    # step; only the second step of the first pass is recomputed ahead.
    assert plain_calls == 2 * 2 * 3 and len(calls) == plain_calls + 3


def test_bf16_policy_with_recomputed_old_log_probs_starts_at_ratio_one(tiny_sd):
    policy, rollout = _rollout_and_policy(tiny_sd, autocast_dtype="bf16", channels_last=True)
    metrics, _ = _update(
        policy, rollout, recompute_old_log_probs=True, autocast_dtype="bf16", channels_last=True
    )
    assert metrics["losses/ratio_dev_first"] < 1e-6  # recomputed in the very micro-batch it is compared in
    assert metrics["losses/old_log_prob_dev"] >= 0


def test_speed_options_keep_the_policy_numerically_close(tiny_sd):
    from agents.policy import GaussianDenoisingPolicy
    from tests.conftest import make_env

    env = make_env(tiny_sd, num_envs=3)
    obs, _ = env.reset(seed=0)
    ref = GaussianDenoisingPolicy(env.family.load_network(), env.family).distribution(obs["x_t"], obs["t"], obs["prompt"]).mean
    cl = GaussianDenoisingPolicy(env.family.load_network(), env.family, channels_last=True)
    torch.testing.assert_close(
        cl.distribution(obs["x_t"], obs["t"], obs["prompt"]).mean, ref, rtol=1e-4, atol=1e-5
    )
    bf = GaussianDenoisingPolicy(env.family.load_network(), env.family, autocast_dtype="bf16")
    mean = bf.distribution(obs["x_t"], obs["t"], obs["prompt"]).mean
    assert mean.dtype == torch.float32
    assert float((mean - ref).norm() / ref.norm()) < 0.05  # bf16 rounding, amplified by guidance 5
    with pytest.raises(ValueError, match="autocast_dtype"):
        GaussianDenoisingPolicy(env.family.load_network(), env.family, autocast_dtype="int8")
    # Math attention (matmuls + softmax) against the fused kernel: the same policy up to rounding.
    math_attn = GaussianDenoisingPolicy(env.family.load_network(), env.family, attention="math")
    processors = {type(p).__name__ for p in math_attn.unet.attn_processors.values()}
    assert processors == {"AttnProcessor"}
    torch.testing.assert_close(
        math_attn.distribution(obs["x_t"], obs["t"], obs["prompt"]).mean, ref, rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="attention='flash'; expected None or one of"):
        GaussianDenoisingPolicy(env.family.load_network(), env.family, attention="flash")


def test_throughput_replays_a_backward_only_where_one_ran():
    """A call made with autograd on whose output was detached (old log-probs recomputed) is forward-only."""
    from types import SimpleNamespace

    from benchmarks.throughput import UNetRecorder

    unet = torch.nn.Linear(4, 4)
    policy = SimpleNamespace(network=unet, device=torch.device("cpu"))
    policy.forward_network = lambda x, t, cond: unet(x)
    recorder = UNetRecorder(policy)
    recorder.on = True
    x, t, cond = torch.randn(3, 4), torch.zeros(3), {"encoder_hidden_states": torch.zeros(3, 2, 4)}
    policy.forward_network(x, t, cond).sum().backward()  # a training call
    policy.forward_network(x, t, cond).detach()  # autograd on, no backward
    with torch.no_grad():
        policy.forward_network(x, t, cond)  # a sampling call
    assert [call[3] for call in recorder.calls] == [True, False, False]  # a backward reached it
    assert [call[5] for call in recorder.calls] == [True, True, False]  # replayed in its grad mode
    assert sum(recorder.replay()) > 0 and all(p.grad is None for p in unet.parameters())


def test_stale_runs_are_moved_aside_not_reused(tmp_path):
    from agents.config import preset_config
    from agents.trainer import config_json
    from benchmarks.rundirs import set_aside_if_stale

    folder = tmp_path / "ddpo-is" / "seed0"
    folder.mkdir(parents=True)
    old = preset_config("tiny", "ddpo-is", run_dir=str(folder))
    (folder / "config.json").write_text(config_json(old))
    (folder / "result.json").write_text("{}")
    # Same computation (progress bars and folder do not count): reused.
    assert set_aside_if_stale(folder, old.replace(progress=not old.progress, run_dir="elsewhere")) is None
    assert (folder / "result.json").exists()
    # Another clip range: moved aside with everything in it, so the run is redone.
    aside = set_aside_if_stale(folder, old.replace(clip_range=old.clip_range * 2))
    assert aside is not None and not folder.exists()
    assert (aside / "result.json").read_text() == "{}" and aside.name.startswith("seed0.stale-")
    assert set_aside_if_stale(folder, old) is None  # nothing there any more


def test_improvement_overrides_and_table():
    from benchmarks.improvement import main, parse_overrides, table

    assert parse_overrides(["num_inner_epochs=2", "clip-range=1e-3", "lora_rank=none"]) == {
        "num_inner_epochs": 2, "clip_range": 1e-3, "lora_rank": None}  # fmt: skip
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        parse_overrides(["no_such_field=1"])
    with pytest.raises(SystemExit, match="cannot read"):
        parse_overrides(["num_inner_epochs=two"])
    with pytest.raises(SystemExit):  # a trial that would overwrite the preset's own runs
        main(["--set", "num_inner_epochs=2"])
    rows = [
        {"task": "T", "algo": "a", "seed": s, "reward_queries": 64, "d": d} for s, d in ((1, 2.0), (0, 1.0))
    ]
    md = table(rows).splitlines()
    assert md[-1] == "| T | a | 64 | 2 | 1.00, 2.00 | 1.50 ± 0.71 |"
    rows.append({"task": "T", "algo": "a", "seed": 2, "reward_queries": 64, "d": None, "diverged": "NaN"})
    assert table(rows).splitlines()[-1] == "| T | a | 64 | 3 | 1.00, 2.00, diverged | 1.50 ± 0.71 (1 diverged) |"


def test_improvement_report_reads_preset_runs_only(tmp_path):
    from benchmarks.improvement import main

    task = "Denoise-Tiny-Compressibility-v0"
    for folder, d in (("ddpo-is/seed0", 1.0), ("ddpo-is/seed1", 2.0), ("ddpo-is/seed0.stale-x", 9.0),
                      ("ddpo-is+trial/seed0", 9.0), ("rwr/seed0", -1.0)):  # fmt: skip
        (tmp_path / task / folder).mkdir(parents=True)
        (tmp_path / task / folder / "result.json").write_text(
            json.dumps({"task": task, "algo": folder.split("/")[0], "reward_queries": 64, "d": d})
        )
    out = tmp_path / "report"
    results = main(["--runs", str(tmp_path), "--tasks", "Compressibility", "--algos", "ddpo-is", "rwr",
                    "--report", str(out)])  # fmt: skip
    assert sorted(r["d"] for r in results) == [-1.0, 1.0, 2.0]
    md = (out / "improvement.md").read_text()
    assert "| 1.00, 2.00 | 1.50 ± 0.71 |" in md and "| -1.00 | -1.00 |" in md
    assert len(json.loads((out / "improvement.json").read_text())) == 3
    with pytest.raises(SystemExit):
        main(["--runs", str(tmp_path), "--tasks", "Incompressibility", "--report", str(out)])


def test_reward_throughput_measures_the_chosen_rewards(capsys):
    from benchmarks import reward_throughput

    reward_throughput.main(["--only", "pickscore", "image_reward", "remote", "--sizes", "16", "--batch", "2",
                            "--seconds", "0.05"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split("[")[0].strip(): float(line.split()[-1]) for line in lines if "[" in line and "16x16" in line}
    assert set(rows) == {"pickscore", "image_reward", "remote"} and all(r > 0 for r in rows.values())
    assert any("TINY RANDOM" in line for line in lines if line.startswith("pickscore"))
    with pytest.raises(SystemExit):
        reward_throughput.main(["--only", "geneval"])


def test_equal_time_takes_the_fastest_algorithm_s_run_time_as_budget(tmp_path):
    from benchmarks import equal_time

    def rows(epoch_s, rewards):  # 64 queries per epoch; each epoch split 1/3 sampling, 2/3 training
        return [{"perf/sample_s": s / 3, "perf/train_s": 2 * s / 3, "charts/reward_mean": r,
                 "charts/reward_queries": 64 * (i + 1)} for i, (s, r) in enumerate(zip(epoch_s, rewards))]  # fmt: skip

    fast = rows([10, 10, 10, 10], [0.0, 1.0, 2.0, 3.0])  # 40 s in all
    slow = rows([20, 20, 20, 20], [5.0, 6.0, 7.0, 8.0])  # by 40 s: two epochs
    assert equal_time.reward_by_time(slow, 40.0, last=3) == (5.5, 128)
    assert equal_time.reward_by_time(slow, 19.0) == (None, 0)
    # Written as leaderboard folders: the fast algorithm's 2 seeds take 40 and 44 s (median 42 s = T).
    for algo, seeds in {"fast": [fast, rows([11] * 4, [1.0] * 4)], "slow": [slow]}.items():
        for i, r in enumerate(seeds):
            d = tmp_path / "Task-v0" / algo / f"seed{i}"
            d.mkdir(parents=True)
            (d / "result.json").write_text("{}")
            (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in r))
    (tmp_path / "Task-v0" / "slow" / "seed0.set-aside").mkdir()  # not a run of the table
    t, table = equal_time.compare(equal_time.load_runs(tmp_path, "Task-v0"), last=2)
    assert t == pytest.approx(42.0)
    by = {r["algo"]: r for r in table}
    assert by["fast"]["reward_at_T"] == pytest.approx((1.75, 0.75))  # seed 0: (2+3)/2; seed 1: 1 (3 epochs by 42 s)
    assert by["slow"]["reward_at_T"] == (5.5, 0.0) and by["slow"]["queries_at_T"] == 128
    assert by["fast"]["final_reward"] == pytest.approx((2.5 + 1.0) / 2)
    with pytest.raises(SystemExit, match="no finished runs"):
        equal_time.main(["--tasks", "Nope-v0", "--runs", str(tmp_path)])
