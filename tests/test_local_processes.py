"""A CPU run started without a launcher, data-parallel on processes forked on this machine (TrainConfig.processes).

The forked run must be the torchrun run: the same samples as one process (sharded by global batch index),
the same update up to summation order, one writer; a failing process must stop its siblings; and the
automatic choice must keep to one process wherever the user chose threads, a launcher runs, or the
epoch's sampling batches do not divide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import agents.runtime as runtime
from agents.config import TrainConfig
from agents.distributed import run_forked
from agents.trainer import Trainer
from tests.test_distributed import PARAM_ATOL

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tiny_sd, run_dir) -> dict:
    # clip_range 0.5, adam_epsilon 1e-4, LoRA: as tests/test_distributed.py, so rounding cannot flip a clip.
    return dict(env_id="Denoise-SD14-Incompressibility-v0", algo="ddpo-is", num_epochs=2, samples_per_epoch=8,
                sample_batch_size=2, train_batch_size=4, micro_batch_size=16, num_steps=3, learning_rate=1e-3,
                env_kwargs=dict(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog", "a red circle"]),
                run_dir=str(run_dir), progress=False, per_prompt_min_count=2, per_prompt_buffer_size=8,
                num_eval_prompts=1, adam_epsilon=1e-4, lora_rank=2, clip_range=0.5)  # fmt: skip


def _argv(cfg: dict) -> list[str]:
    out = ["train"]
    for key, value in cfg.items():
        flag = "--" + {"env_id": "env"}.get(key, key).replace("_", "-")
        out += [flag, json.dumps(value) if isinstance(value, dict) else str(value).lower() if isinstance(value, bool)
                else str(value)]  # fmt: skip
    return out


@pytest.mark.timeout(600)
def test_forked_run_samples_as_one_process_and_writes_once(tiny_sd, tmp_path):
    cfg = _cfg(tiny_sd, tmp_path / "forked")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", DENOISE_DIST_TIMEOUT_S="120")
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-m", "agents.cli", *_argv(cfg), "--processes", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=500)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "data-parallel on 2 processes of this machine, 1 torch thread(s) each" in proc.stdout
    assert proc.stdout.count('"stopped_by": "reward_query_budget"') + proc.stdout.count('"stopped_by": "num_epochs"') == 1

    ref = Trainer(TrainConfig(**{**cfg, "run_dir": str(tmp_path / "one")}))
    ref.train_epoch()
    state1 = {k: v.clone() for k, v in ref.trainable_state().items()}
    ref.train_epoch()
    run = Path(cfg["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # one writer: one line per epoch
    assert (run / "checkpoints" / "latest").read_text() == "ckpt-0002"
    assert json.loads((run / "config.json").read_text())["processes"] == 2
    # Epoch 0: the same samples as one process (sharded by global batch index).
    assert rows[0]["charts/reward_mean"] == pytest.approx(ref.history[0]["charts/reward_mean"], rel=1e-6)
    assert [r["losses/optimizer_steps"] for r in rows] == [r["losses/optimizer_steps"] for r in ref.history]
    # The same updates up to summation order (tolerance: tests/test_distributed.py, per epoch); a lost or
    # double-counted gradient shard moves parameters by ~lr/2 = 5e-4.
    for name, want in (("ckpt-0001", state1), ("ckpt-0002", ref.trainable_state())):
        got = load_file(str(run / "checkpoints" / name / "weights.safetensors"))
        assert got.keys() == want.keys()
        assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 2 * PARAM_ATOL, name


def test_a_failing_process_stops_its_siblings_and_its_code_is_returned(tmp_path):
    def fn() -> int:
        (tmp_path / f"rank{os.environ['RANK']}").write_text(os.environ["WORLD_SIZE"] + " " + os.environ["LOCAL_WORLD_SIZE"])
        if os.environ["RANK"] == "1":
            return 3
        time.sleep(60)  # a sibling waiting in a collective for the failed one
        return 0

    start = time.monotonic()
    assert run_forked(2, 1, fn, grace_s=1.0) == 3
    assert time.monotonic() - start < 30
    assert (tmp_path / "rank0").read_text() == "2 2" and (tmp_path / "rank1").read_text() == "2 2"
    assert run_forked(2, 1, lambda: 0) == 0
    assert run_forked(2, 1, lambda: 130) == 130  # stopped by Ctrl-C: the interrupted run's code


def test_automatic_choice(monkeypatch):
    monkeypatch.setattr(runtime, "AUTO_PROCESSES", True)
    monkeypatch.setattr(runtime, "idle_cores", lambda: 4)
    monkeypatch.setattr(runtime, "threads_chosen_by_user", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runtime.local_processes(0, 0, 2, "cpu") == 2  # the sampling batches bound it
    assert runtime.local_processes(0, 0, 8, "cpu") == 4  # the idle cores bound it
    assert runtime.local_processes(0, 0, 3, "cpu") == 3
    assert runtime.local_processes(0, 0, 5, "cpu") == 1  # no divisor of 5 in 2..4
    assert runtime.local_processes(0, 2, 8, "cpu") == 1  # threads chosen: one process with them
    assert runtime.local_processes(0, 0, 8, "cuda") == 1
    assert runtime.local_processes(3, 0, 3, "cpu") == 3  # asked for
    monkeypatch.setattr(runtime, "threads_chosen_by_user", lambda: True)  # OMP_NUM_THREADS, torch.set_num_threads
    assert runtime.local_processes(0, 0, 8, "cpu") == 1
    monkeypatch.setattr(runtime, "threads_chosen_by_user", lambda: False)
    monkeypatch.setattr(runtime, "idle_cores", lambda: 1)
    assert runtime.local_processes(0, 0, 8, "cpu") == 1  # another job holds the other cores
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: the launcher decides
    assert runtime.local_processes(0, 0, 8, "cpu") == 1
    with pytest.raises(ValueError, match=r"processes=2 in a process that a launcher started \(WORLD_SIZE=2\)"):
        runtime.local_processes(2, 0, 8, "cpu")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(runtime, "AUTO_PROCESSES", False)
    assert runtime.local_processes(0, 0, 8, "cpu") == 1


def test_processes_must_divide_the_sampling_batches_and_run_on_cpu():
    with pytest.raises(ValueError, match=r"processes=3: expected a divisor of the epoch's 2 sampling batch\(es\)"):
        TrainConfig(samples_per_epoch=64, sample_batch_size=32, processes=3).validate()
    with pytest.raises(ValueError, match=r"processes=2 with device='cuda'.*torchrun or accelerate launch"):
        TrainConfig(samples_per_epoch=64, sample_batch_size=32, processes=2, device="cuda").validate()
    with pytest.raises(ValueError, match=r"processes=-1: expected an integer >= 0"):
        TrainConfig(processes=-1).validate()
    assert TrainConfig(samples_per_epoch=64, sample_batch_size=32, processes=2).validate().processes == 2
