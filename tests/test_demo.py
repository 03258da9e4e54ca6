"""``make demo`` (agents/demo.py): one epoch in one process and data-parallel in two forked ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo(run_dir: Path, *options: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", DENOISE_DIST_TIMEOUT_S="120")
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run([sys.executable, "-m", "agents.demo", "--epochs", "1", "--run-dir", str(run_dir), *options],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)  # fmt: skip


@pytest.mark.timeout(900)
def test_demo_in_one_process_then_forked_keeps_the_first_run_and_samples_alike(tmp_path):
    run = tmp_path / "demo"
    one = _demo(run, "--threads", "1")
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    assert "data-parallel" not in one.stdout and "training on 1 process(es) × 1 torch thread(s)" in one.stdout
    first = json.loads((run / "demo_summary.json").read_text())
    assert (first["processes"], first["epochs"], first["reward_queries"]) == (1, 1, 64)

    forked = _demo(run, "--processes", "2", "--threads", "1")
    assert forked.returncode == 0, forked.stdout[-2000:] + forked.stderr[-3000:]
    assert "data-parallel on 2 processes of this machine, 1 torch thread(s) each" in forked.stdout
    assert forked.stdout.count("improvement_in_base_std =") == 1  # one report, from the main process
    # The first run is kept aside, not overwritten.
    assert json.loads((tmp_path / "demo-previous" / "demo_summary.json").read_text()) == first
    second = json.loads((run / "demo_summary.json").read_text())
    assert (second["processes"], second["epochs"], second["reward_queries"]) == (2, 1, 64)
    # The same base model at the same evaluation seeds, and the same epoch-0 samples (sharded by batch index).
    assert second["eval_reward_before"] == first["eval_reward_before"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows_one = [json.loads(x) for x in (tmp_path / "demo-previous" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(rows_one) == 1
    assert rows[0]["charts/reward_mean"] == pytest.approx(rows_one[0]["charts/reward_mean"], rel=1e-6)
    for name in ("grid_before.png", "grid_after.png", "reward_curve.png"):
        assert (run / name).stat().st_size > 0


def test_demo_rejects_bad_process_counts(tmp_path):
    proc = _demo(tmp_path / "demo", "--processes", "3")
    assert proc.returncode == 2 and "processes=3" in proc.stderr and not (tmp_path / "demo").exists()
