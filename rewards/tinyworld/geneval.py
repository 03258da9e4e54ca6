"""A GenEval-style rule reward for the tiny world: the share of a prompt's checks that an image passes.

GenEval (Ghosh et al., 2023) scores compositional prompts by object detection: is each object there, with
the right colour, in the right number and position. The tiny world's captioner
(:mod:`rewards.tinyworld.captioner`) reads every object back from pixels exactly, so each check is exact:

==================  =====================================================================  ==============
check               holds when                                                              checks/image
==================  =====================================================================  ==============
object *i*          the prompt's *i*-th object is found with its colour and shape           1 per object
count               the image holds exactly as many objects as the prompt names             1
size                the lone object has the prompt's size ("small"/"large")                  1 if named
relation / order    two objects are placed as the relation says; three are left to right    1 if 2+ objects
==================  =====================================================================  ==============

reward = (checks passed) / (checks of the prompt), in [0, 1]. With ``all_correct_weight`` w (default 0) the
reward leans toward the strict bit: (1 − w)·share + w·all_correct, still in [0, 1] (w = 1: the strict GenEval
bit alone; 0: the share). ``reward_info`` gives, per image,
``all_correct`` (the strict GenEval bit: every check passed), ``checks_passed``, ``checks_total``, and each
check's result as a float tensor (1 pass, 0 fail, NaN where the prompt has no such check):
``objects`` (the share of objects right), ``count``, ``size``, ``relation``.

Prompts must be tiny-world captions (:func:`rewards.tinyworld.world.parse_prompt`); others are refused
with the caption grammar in the error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rewards.base import RewardInfo


def _flag(value: bool | None) -> float:
    return math.nan if value is None else float(value)


class TinyGenEval:
    """Reward = share of the prompt's GenEval-style checks (objects, count, size, relation) the image passes."""

    name = "tiny_geneval"
    unit = "share of the prompt's checks passed"

    def __init__(self, all_correct_weight: float = 0.0) -> None:
        w = float(all_correct_weight)
        if not 0.0 <= w <= 1.0:  # NaN fails too
            raise ValueError(f"all_correct_weight={all_correct_weight!r}; expected a number in [0, 1] "
                             "(0: the share of checks passed, 1: the strict all-correct bit)")  # fmt: skip
        self.all_correct_weight = w

    def __call__(self, images, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        from rewards.tinyworld.captioner import score

        results = score(images, prompts)
        passed, total = [], []
        for r in results:
            checks = [r["objects_correct"], int(r["count"])]
            n = r["n_expected"] + 1
            for extra in (r["size"], r["relation"]):
                if extra is not None:
                    checks.append(int(extra))
                    n += 1
            passed.append(sum(checks))
            total.append(n)
        passed_t = torch.tensor(passed, dtype=torch.float32)
        total_t = torch.tensor(total, dtype=torch.float32)
        info: RewardInfo = {
            "all_correct": torch.tensor([float(r["all_correct"]) for r in results]),
            "checks_passed": passed_t,
            "checks_total": total_t,
            "objects": torch.tensor([r["objects_correct"] / r["n_expected"] for r in results]),
            "count": torch.tensor([float(r["count"]) for r in results]),
            "size": torch.tensor([_flag(r["size"]) for r in results]),
            "relation": torch.tensor([_flag(r["relation"]) for r in results]),
        }
        w = self.all_correct_weight  # w = 0 gives the share exactly (all_correct is 0 or 1)
        return (1 - w) * (passed_t / total_t) + w * info["all_correct"], info

    def __repr__(self) -> str:
        return f"TinyGenEval(all_correct_weight={self.all_correct_weight})" if self.all_correct_weight else "TinyGenEval()"
