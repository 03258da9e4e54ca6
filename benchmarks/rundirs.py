"""Finished benchmark runs are reused only while they still answer the question asked now.

A benchmark (leaderboard, improvement) keeps each finished run folder and skips it next time. When a
preset changes afterwards, the old result no longer belongs to the table; :func:`set_aside_if_stale`
moves such a folder aside (never deletes it: nothing a user made is lost) so that the run is redone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from agents.config import TrainConfig
from agents.trainer import config_json

# Fields that do not change what a run computes; a difference in them does not make a run stale.
# threads: a machine's setting (the same seeds give the same run up to float rounding, as on another CPU).
NOT_RESULT_FIELDS = ("progress", "run_dir", "diagnostic_samples", "threads", "processes", "keep_checkpoints")  # diagnostics: metrics only


def comparable(cfg_json: str) -> dict[str, Any]:
    """A saved config as a dict to compare; through TrainConfig so that newer fields read as defaults."""
    data = json.loads(json.dumps(TrainConfig.from_dict(json.loads(cfg_json)).to_dict()))
    return {k: v for k, v in data.items() if k not in NOT_RESULT_FIELDS}


def set_aside_if_stale(folder: Path, cfg: TrainConfig) -> Path | None:
    """Move ``folder`` to ``<name>.stale-<time>`` when its saved config differs from ``cfg``.

    Returns the new location, or None when the folder is absent, has no config yet, or matches.
    """
    saved = Path(folder) / "config.json"
    if not saved.exists():
        return None
    try:
        same = comparable(saved.read_text()) == comparable(config_json(cfg))
    except (ValueError, TypeError):  # unreadable or from an incompatible version: not this run's
        same = False
    if same:
        return None
    aside = Path(folder).with_name(f"{Path(folder).name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(folder, aside)
    print(
        f"{folder}: made with another config than the current one; moved to {aside.name}, rerunning",
        flush=True,
    )
    return aside
