"""Settings that cannot work together are warned about with the reason; a run leaves no unclosed files."""

from __future__ import annotations

import gc
import json
import warnings

import pytest

from agents.config import TrainConfig, compatibility_warnings, preset_config


def _cfg(tiny_sd, run_dir, **kw):
    base = dict(env_id="Denoise-SD14-Incompressibility-v0", algo="ddpo-is", num_epochs=1, samples_per_epoch=2,
                sample_batch_size=2, train_batch_size=2, micro_batch_size=16, num_steps=2, num_eval_prompts=1,
                per_prompt_min_count=2, per_prompt_buffer_size=8, run_dir=str(run_dir), progress=False,
                env_kwargs=dict(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog"]))  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_sum_reduction_with_a_mean_tuned_clip_range_is_warned_about_with_the_scale():
    (msg,) = compatibility_warnings(TrainConfig(log_prob_reduction="sum", clip_range=1e-4), latent_dim=256)
    assert "clip_range=0.0001" in msg and "D=256" in msg and "exp(±D·δ)" in msg and "about 0.0256" in msg
    assert compatibility_warnings(TrainConfig(log_prob_reduction="mean", clip_range=1e-4), latent_dim=256) == []
    assert compatibility_warnings(TrainConfig(log_prob_reduction="sum", clip_range=0.2), latent_dim=256) == []
    assert compatibility_warnings(TrainConfig(algo="rwr", log_prob_reduction="sum"), latent_dim=256) == []
    # the mean scale reaches 2e-2 (the tiny flow model's trials, agents/ddpo_is.py); the tiny presets' 1e-3
    assert len(compatibility_warnings(TrainConfig(log_prob_reduction="sum", clip_range=2e-2), latent_dim=256)) == 1
    for env_id in ("Denoise-Tiny-Compressibility-v0", "Denoise-TinyFlow-Compressibility-v0"):
        cfg = preset_config("tiny", "ddpo-is", env_id=env_id, log_prob_reduction="sum")
        assert len(compatibility_warnings(cfg, latent_dim=256)) == 1, env_id


def test_the_trainer_warns_with_the_env_latent_size(tiny_sd, tmp_path):
    from agents.trainer import Trainer

    with pytest.warns(UserWarning, match=r"log_prob_reduction='sum' with clip_range=0.0001.*D=256"):
        Trainer(_cfg(tiny_sd, tmp_path / "run", log_prob_reduction="sum")).close()  # latents 4×8×8


def test_cli_prints_the_warning_as_one_line(tiny_sd, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    kw = dict(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog"])
    proc = subprocess.run(
        [sys.executable, "-m", "agents.cli", "train", "--env", "Denoise-SD14-Incompressibility-v0", "--algo", "ddpo-is",
         "--num-epochs", "1", "--samples-per-epoch", "2", "--sample-batch-size", "2", "--train-batch-size", "2",
         "--num-steps", "2", "--per-prompt-min-count", "2", "--num-eval-prompts", "1", "--progress", "false",
         "--log-prob-reduction", "sum", "--env-kwargs", json.dumps(kw), "--run-dir", str(tmp_path / "r")],
        env=dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), cwd=root,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "log_prob_reduction='sum'" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: log_prob_reduction='sum'"), proc.stderr[-3000:]


def test_a_run_leaves_no_unclosed_file(tiny_sd, tmp_path):
    from agents.trainer import Trainer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with Trainer(_cfg(tiny_sd, tmp_path / "run")) as trainer:
            trainer.train()
            trainer.plot_reward_curve()
        del trainer
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed
    assert (tmp_path / "run" / "reward_curve.png").exists()
