"""The learning-rate decay over a run's planned epochs (TrainConfig.lr_decay)."""

from __future__ import annotations

import math

import pytest

from agents.config import TrainConfig
from agents.core import lr_decay_factor
from agents.trainer import Trainer


def test_decay_factors():
    assert [lr_decay_factor("constant", e, 4) for e in range(4)] == [1.0, 1.0, 1.0, 1.0]
    assert [lr_decay_factor("linear", e, 4) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cos = [lr_decay_factor("cosine", e, 4) for e in range(4)]
    assert cos == pytest.approx([1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2])
    with pytest.raises(ValueError, match="expected one of"):
        lr_decay_factor("step", 0, 4)


def _cfg(tiny_sd, run_dir, **kw) -> TrainConfig:
    base = dict(env_id="Denoise-SD14-Incompressibility-v0", algo="ddpo-is", num_epochs=4, samples_per_epoch=2,
                sample_batch_size=2, train_batch_size=2, micro_batch_size=16, num_steps=2, learning_rate=1e-3,
                env_kwargs=dict(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog"]),
                run_dir=str(run_dir), progress=False, num_eval_prompts=1, diagnostic_samples=0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("warmup", [0, 2])
def test_a_run_decays_its_learning_rate_by_epoch_and_resumes_the_schedule(tiny_sd, tmp_path, warmup):
    # The budget binds (3 epochs of the 4 asked): the decay runs over the planned 3.
    cfg = _cfg(tiny_sd, tmp_path / "run", lr_decay="linear", reward_query_budget=6, lr_warmup_steps=warmup)
    with Trainer(cfg.replace(num_epochs=2, reward_query_budget=0)) as tr:  # stops after 2 of 2 epochs
        first = [h["charts/learning_rate"] for h in tr.train()]
    with Trainer(cfg, resume=True) as tr:  # the resumed run is planned for 3 epochs: its third trains at 1/3
        rest = [h["charts/learning_rate"] for h in tr.train()][2:]  # train() returns the whole history
    warm = [min(1.0, (k + 1) / warmup) if warmup else 1.0 for k in range(3)]  # one optimizer step per epoch
    # epochs 0 and 1 were planned as 2 epochs (factors 1, 1/2); epoch 2 of 3 trains at 1 - 2/3
    assert first == pytest.approx([1e-3 * warm[0], 1e-3 * 0.5 * warm[1]])
    assert rest == pytest.approx([1e-3 * (1 / 3) * warm[2]])


def test_constant_leaves_the_learning_rate_alone(tiny_sd, tmp_path):
    with Trainer(_cfg(tiny_sd, tmp_path / "run", num_epochs=2)) as tr:
        assert [h["charts/learning_rate"] for h in tr.train()] == [1e-3, 1e-3]


def test_unknown_decays_are_refused(tiny_sd, tmp_path):
    with pytest.raises(ValueError, match=r"lr_decay='step': expected one of \['constant', 'linear', 'cosine'\]"):
        _cfg(tiny_sd, tmp_path / "run", lr_decay="step").validate()
