"""benchmarks/end_to_end.py: whole `denoise-gym train` runs in fresh processes, reference style against fast."""

from __future__ import annotations

import json

import pytest

from agents.config import preset_config
from benchmarks import end_to_end
from benchmarks.end_to_end import flat_config
from benchmarks.throughput import REFERENCE_STYLE

SMALL = "--num-steps 2 --samples-per-epoch 16 --sample-batch-size 16 --train-batch-size 16 --num-eval-prompts 2"


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    from diffusion_env.testing import build_random_model

    return build_random_model(tmp_path_factory.mktemp("micro") / "model", size="micro")


def _config_of(argv):
    from agents import cli
    from agents.cliargs import given_options

    args = cli.build_parser().parse_args(argv)
    return cli.new_train_config(given_options(args, cli.CONFIG_FIELDS), args.preset)


def test_reference_style_turns_off_every_speed_up():
    # A speed field added to TrainConfig must be turned off in the reference style too.
    assert set(end_to_end.speed_fields()) >= {"channels_last", "autocast_dtype", "compile_network", "attention"}
    assert set(end_to_end.speed_fields()) <= set(REFERENCE_STYLE)
    assert REFERENCE_STYLE["compile_network"] is False and REFERENCE_STYLE["autocast_dtype"] is None
    assert REFERENCE_STYLE["channels_last"] is False and REFERENCE_STYLE["attention"] == "sdpa"
    assert REFERENCE_STYLE["sample_batch_size"] == REFERENCE_STYLE["train_batch_size"] == 16


def test_commands_parse_to_the_preset_and_to_the_reference_style(tmp_path):
    args = end_to_end.parse_args(["--extra", "--micro-batch-size 64 --compile-network true", "--budget", "256"])
    args.env_kwargs = {}
    fast = _config_of(end_to_end.train_argv(args, "fast", tmp_path / "f"))
    ref = _config_of(end_to_end.train_argv(args, "reference", tmp_path / "r"))
    preset = preset_config("tiny", "ddpo-is")
    assert fast.micro_batch_size == 64 and fast.compile_network is True  # --extra reaches the fast run
    assert fast.train_batch_size == preset.train_batch_size and fast.num_inner_epochs == preset.num_inner_epochs
    for name, value in REFERENCE_STYLE.items():  # and the reference style wins over it
        assert getattr(ref, name) == value, name
    for cfg, folder in ((fast, "f"), (ref, "r")):
        assert (cfg.reward_query_budget, cfg.progress, cfg.run_dir) == (256, False, str(tmp_path / folder))
        assert cfg.learning_rate == preset.learning_rate and cfg.num_inner_epochs == preset.num_inner_epochs
    with pytest.raises(ValueError, match="expected one of"):
        end_to_end.train_argv(args, "slow", tmp_path)


def test_epoch_figures_leave_out_the_first_epoch():
    rows = [{"perf/sample_s": 5.0, "perf/train_s": 4.0, "losses/ratio_dev_first": 0.0},
            {"perf/sample_s": 1.0, "perf/train_s": 2.0, "losses/ratio_dev_first": 3e-7},
            {"perf/sample_s": 1.5, "perf/train_s": 2.5, "losses/ratio_dev_first": 1e-7}]  # fmt: skip
    f = end_to_end.epoch_figures(rows)
    assert f["epoch_s"] == [9.0, 3.0, 4.0] and f["first_epoch_s"] == 9.0 and f["steady_epoch_s"] == 3.5
    assert f["ratio_dev_first"] == 0.0 and f["ratio_dev_first_max"] == 3e-7
    assert end_to_end.epoch_figures(rows[:1])["steady_epoch_s"] is None


def test_both_styles_run_cold_in_their_own_processes(micro_model, tmp_path):
    out, work = tmp_path / "e2e.json", tmp_path / "runs"
    result = end_to_end.main(["--model", str(micro_model), "--budget", "32", "--threads", "1", "--extra", SMALL,
                              "--json", str(out), "--work-dir", str(work), "--poll-s", "0.2"])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["summary"]["cold_speedup"] == pytest.approx(result["summary"]["cold_speedup"])
    runs = saved["runs"]
    assert [(r["style"], r["repeat"]) for r in runs] == [("reference", 0), ("fast", 0)]
    for r in runs:
        assert r["wall_s"] > 0 and 0 < r["to_last_checkpoint_s"] <= r["wall_s"] + 1  # mtimes: coarse clock
        assert (r["reward_queries"], r["epochs"], len(r["epoch_s"])) == (32, 2, 2)  # 2 epochs of 16 samples
        assert r["samples_per_s"] == pytest.approx(32 / r["wall_s"])
        assert r["steady_epoch_s"] == r["epoch_s"][1] > 0
        assert r["peak_rss_mb"] > 50  # a process that imported torch and trained: far above 50 MB
        assert r["peak_rss_waited_mb"] >= r["peak_rss_mb"]  # wait4's figure covers the child itself
        assert 50 < r["peak_tree_pss_mb"] <= r["peak_tree_rss_mb"] + 1  # PSS counts shared pages once
        assert r["max_processes"] >= 1  # (a transient helper such as ldconfig may show up in a poll)
        assert "data-parallel on" not in (work / f"{r['style']}-0" / "child.log").read_text()  # --threads 1: one
        assert r["torch_threads"] == 1
        assert r["ratio_dev_first"] < 1e-6  # fp32: the first PPO ratio is exactly 1
        # Each run had its own empty compile cache, and wrote its config where the benchmark read it.
        assert (work / f"{r['style']}-0" / "compile-cache" / "torchinductor").is_dir()
        config = json.loads((work / f"{r['style']}-0" / "run" / "config.json").read_text())
        assert config == r["config"]
        assert config["env_kwargs"] == {"model": str(micro_model.resolve())} and config["num_steps"] == 2
    ref, fast = (flat_config(r["config"]) for r in runs)
    assert all(ref[k] == v for k, v in REFERENCE_STYLE.items()) and runs[0]["reference_overrides_applied"]
    preset = preset_config("tiny", "ddpo-is")
    assert fast["micro_batch_size"] == preset.micro_batch_size  # the fast run takes the preset's sizes,
    assert fast["processes"] == preset.processes != REFERENCE_STYLE["processes"]  # not the reference's one process
    s = saved["summary"]
    assert s["cold_speedup"] == pytest.approx(runs[0]["wall_s"] / runs[1]["wall_s"])
    assert s["rss_ratio"] == pytest.approx(runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"])
    assert s["memory_ratio"] == pytest.approx(runs[1]["peak_tree_pss_mb"] / runs[0]["peak_tree_pss_mb"])
    assert s["targets"]["ratio_dev_first_ok"] is True
    assert saved["machine"]["cpu_cores"] >= 1 and len(saved["machine"]["load_avg_at_start"]) == 3
