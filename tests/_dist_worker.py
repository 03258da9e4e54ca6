"""One process of a data-parallel test run (started by tests/test_distributed.py with torchrun's variables).

    python tests/_dist_worker.py SPEC.json

SPEC: {"out": folder, "runs": [{"name": str, "resume": bool, "config": {TrainConfig fields}}],
"fail_collect_on_rank": optional rank whose sampling raises (a fault drill), "imports": optional modules to
import first (algorithms registered from outside, such as benchmarks.examples.my_algo)}.
Each run trains (``Trainer.train``) and every rank writes ``<out>/<name>-rank<r>.safetensors`` (its
trainable parameters) and ``<out>/<name>-rank<r>.json`` (its metrics history).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # two processes share two cores


def main(spec_path: str) -> None:
    from safetensors.torch import save_file

    from agents import distributed
    from agents.config import TrainConfig
    from agents.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    for module in spec.get("imports", []):  # modules that register algorithms (benchmarks/examples)
        importlib.import_module(module)
    out = Path(spec["out"])
    for run in spec["runs"]:
        trainer = Trainer(TrainConfig(**run["config"]), resume=run.get("resume", False))
        if spec.get("fail_collect_on_rank") == trainer.dist.rank:

            def fail(epoch: int):
                raise RuntimeError("injected sampling failure")

            trainer.collect = fail
        history = trainer.train()
        rank = trainer.dist.rank
        save_file(trainer.trainable_state(), str(out / f"{run['name']}-rank{rank}.safetensors"))
        (out / f"{run['name']}-rank{rank}.json").write_text(
            json.dumps({"history": history, "world_size": trainer.dist.world_size, "epoch": trainer.epoch})
        )
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
