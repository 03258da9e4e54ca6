"""Kill drill: SIGKILL a CLI training run in the middle of an epoch, resume it, and compare with a run
that was never interrupted (CPU, fixed seed). Nothing after the last complete checkpoint may be
needed, nothing before it may be lost, and the run directory must stay loadable throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
NUM_EPOCHS = 3


def _train_cmd(tiny_sd: Path, run_dir: Path) -> list[str]:
    env_kwargs = json.dumps(dict(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog"]))
    return [sys.executable, "-m", "agents.cli", "train", "--env", "Denoise-SD14-Incompressibility-v0",
            "--algo", "ddpo-is", "--num-epochs", str(NUM_EPOCHS), "--samples-per-epoch", "4",
            "--sample-batch-size", "2", "--train-batch-size", "2", "--micro-batch-size", "16", "--num-steps", "3",
            "--learning-rate", "1e-3", "--per-prompt-min-count", "2", "--per-prompt-buffer-size", "8",
            "--num-eval-prompts", "1", "--progress", "false", "--seed", "7", "--env-kwargs", env_kwargs,
            "--run-dir", str(run_dir)]  # fmt: skip


def _env() -> dict[str, str]:
    # One thread per process: the runs being compared then use the same kernels and summation order.
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "charts/samples_per_s"} for r in rows]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check_loadable(run: Path) -> str:
    """The checkpoint ``latest`` names is complete and readable; returns its name."""
    name = (run / "checkpoints" / "latest").read_text()
    folder = run / "checkpoints" / name
    load_file(str(folder / "weights.safetensors"))
    load_file(str(folder / "optimizer.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    assert name == f"ckpt-{state['epoch']:04d}"
    return name


@pytest.mark.timeout(480)
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tiny_sd, tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    log_ref = open(tmp_path / "reference.log", "w")
    ref = subprocess.Popen(_train_cmd(tiny_sd, reference), env=_env(), cwd=ROOT, stdout=log_ref, stderr=subprocess.STDOUT)
    log_a = open(tmp_path / "killed.log", "w")
    run = subprocess.Popen(_train_cmd(tiny_sd, killed), env=_env(), cwd=ROOT, stdout=log_a, stderr=subprocess.STDOUT)
    try:
        # Kill as soon as the first checkpoint is complete: epoch 2 is then being sampled.
        deadline = time.monotonic() + 300
        latest = killed / "checkpoints" / "latest"
        while not latest.exists():
            assert run.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        run.send_signal(signal.SIGKILL)
        assert run.wait(timeout=30) == -signal.SIGKILL
    finally:
        if run.poll() is None:
            run.kill()
        log_a.close()
    assert _check_loadable(killed) == "ckpt-0001"  # the kill came before epoch 2's checkpoint
    assert [r["epoch"] for r in _metrics(killed)] == [0]

    # The worst a kill can leave besides that: a half-written checkpoint folder and a torn metrics line.
    torn = killed / "checkpoints" / ".ckpt-0002.tmp"
    torn.mkdir(exist_ok=True)
    (torn / "weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with open(killed / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 1, "charts/reward_queries": 8, "charts/rew')

    resumed = subprocess.run([sys.executable, "-m", "agents.cli", "train", "--resume", str(killed)], env=_env(), cwd=ROOT,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ref.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    log_ref.close()

    assert _check_loadable(killed) == _check_loadable(reference) == f"ckpt-{NUM_EPOCHS:04d}"
    assert not torn.exists()  # the interrupted write's temp folder was cleaned up
    a = load_file(str(killed / "checkpoints" / f"ckpt-{NUM_EPOCHS:04d}" / "weights.safetensors"))
    b = load_file(str(reference / "checkpoints" / f"ckpt-{NUM_EPOCHS:04d}" / "weights.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    rows_killed, rows_ref = _metrics(killed), _metrics(reference)
    assert [r["epoch"] for r in rows_killed] == list(range(NUM_EPOCHS))
    assert _strip(rows_killed) == _strip(rows_ref)
    state_a = json.loads((killed / "checkpoints" / f"ckpt-{NUM_EPOCHS:04d}" / "state.json").read_text())
    state_b = json.loads((reference / "checkpoints" / f"ckpt-{NUM_EPOCHS:04d}" / "state.json").read_text())
    assert state_a["tracker"] == state_b["tracker"] and state_a["reward_queries"] == state_b["reward_queries"]


def _small_cfg(tiny_sd, run_dir):
    from agents.config import TrainConfig

    return TrainConfig(env_id="Denoise-SD14-Incompressibility-v0", algo="ddpo-is", num_epochs=2, samples_per_epoch=2,
                       sample_batch_size=2, train_batch_size=2, micro_batch_size=16, num_steps=2, learning_rate=1e-3,
                       env_kwargs=dict(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog"]),
                       run_dir=str(run_dir), progress=False, per_prompt_min_count=2, per_prompt_buffer_size=8,
                       num_eval_prompts=1)  # fmt: skip


class _Crash(Exception):
    """Stands in for the process dying at this point."""


@pytest.mark.parametrize("crash_at", ["optimizer.safetensors", "state.json", "latest"])
def test_crash_inside_a_checkpoint_write_keeps_the_previous_one(tiny_sd, tmp_path, monkeypatch, crash_at):
    """The process dies while writing checkpoint 2: after its optimizer file, after its state.json (just
    before the folder is renamed into place), or after the rename but before ``latest`` is repointed.
    ``latest`` must still name a complete checkpoint 1, and resuming finishes the run."""
    import agents.trainer as trainer_mod
    from agents.trainer import Trainer

    tr = Trainer(_small_cfg(tiny_sd, tmp_path / "run"))
    tr.train_epoch()
    real_save, real_atomic, real_replace = trainer_mod.save_file, trainer_mod._atomic_write_text, trainer_mod.os.replace

    def save_file(tensors, path):
        real_save(tensors, path)
        if crash_at == "optimizer.safetensors" and path.endswith(crash_at):
            raise _Crash

    def replace(src, dst):
        if crash_at == "state.json" and Path(dst).name == "ckpt-0002":
            raise _Crash
        real_replace(src, dst)

    def atomic(path, text):
        if crash_at == "latest" and path.name == "latest":
            raise _Crash
        real_atomic(path, text)

    monkeypatch.setattr(trainer_mod, "save_file", save_file)
    monkeypatch.setattr(trainer_mod, "_atomic_write_text", atomic)
    monkeypatch.setattr(trainer_mod.os, "replace", replace)
    with pytest.raises(_Crash):
        tr.train_epoch()
    monkeypatch.undo()
    run = tmp_path / "run"
    assert _check_loadable(run) == "ckpt-0001"
    resumed = Trainer(_small_cfg(tiny_sd, run), resume=True)
    assert resumed.epoch == 1
    assert not list((run / "checkpoints").glob(".ckpt-*.tmp"))  # the torn write was cleaned up
    resumed.train_epoch()
    assert _check_loadable(run) == "ckpt-0002"
    assert [r["epoch"] for r in _metrics(run)] == [0, 1]
