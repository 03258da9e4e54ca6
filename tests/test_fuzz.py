"""Bad input, fuzzed with hypothesis: every input is either accepted (and then works) or refused with a
ValueError / RuntimeError whose message says what was expected. Nothing ends in an unhandled
exception from deep inside torch, numpy or safetensors.

Documented handling (asserted below):
- actions: float arrays/tensors of shape [num_envs, *latent_shape], finite, within ±action_bound;
  anything else → ValueError.
- prompts (reset options and prompt lists): any str up to MAX_PROMPT_LENGTH characters, including
  empty, non-ASCII and control characters (the tokenizer normalises and truncates them) → accepted;
  non-strings, wrong counts, empty lists, longer prompts → ValueError.
- configs: TrainConfig.validate() refuses wrong types, non-positive sizes, NaN/inf and out-of-range
  values; settings only the environment can judge (more steps than the scheduler has, unknown env
  ID) → ValueError when the Trainer builds the env.
- checkpoints: a truncated, foreign or missing checkpoint file → ValueError on resume, and the run
  directory is byte-for-byte unchanged.
- rewards: raising → rewards.RewardError (a RuntimeError) naming the reward; NaN/inf → passed
  through (the trainer skips that epoch's update and logs it); wrong shape or type → ValueError.
  A reward raising inside Trainer.train_epoch leaves the run directory resumable.

The number of inputs tried per category is written to ``<pytest basetemp>/fuzz_counts.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from agents.config import TrainConfig
from agents.trainer import Trainer
from diffusion_env.prompts import make_prompt_sampler
from diffusion_env.vector_env import MAX_PROMPT_LENGTH
from rewards import RewardError

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
COUNTS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_counts(tmp_path_factory):
    yield
    path = tmp_path_factory.getbasetemp() / "fuzz_counts.json"
    path.write_text(json.dumps(dict(sorted(COUNTS.items())), indent=1))
    print(f"\nfuzz inputs tried per category: {dict(sorted(COUNTS.items()))} (written to {path})")


@pytest.fixture(scope="module")
def env(tiny_sd):
    e = make_env(tiny_sd, num_envs=2, num_steps=2)
    yield e
    e.close()


# A clear message says what was expected, or what to do instead.
GUIDANCE = ("expected", "must", "use ", "choose", "make ")


def _says_what_to_do(message: str) -> bool:
    return any(g in message for g in GUIDANCE)


def _expect_clear_error(exc: BaseException) -> None:
    assert isinstance(exc, (ValueError, RuntimeError)), f"{type(exc).__name__}: {exc}"
    assert _says_what_to_do(str(exc)) or isinstance(exc, RewardError), str(exc)


# ---------------------------------------------------------------------------------------- actions
DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_, np.complex64]
SPECIAL = [0.0, 1.0, -3.5, 99.9, 100.0, 100.5, 1e30, -1e30, math.nan, math.inf, -math.inf]


@settings(FUZZ, max_examples=120)
@given(
    shape=st.sampled_from(["ok", "ok", "ok", "other"]).flatmap(
        lambda s: st.just(s) if s == "ok" else st.lists(st.integers(0, 5), max_size=5).map(tuple)
    ),
    dtype=st.sampled_from(DTYPES + [np.float32, np.float32, np.float64]),
    value=st.one_of(st.sampled_from(SPECIAL), st.floats(-200, 200, width=32)),
    poison=st.sampled_from([None, None, None, math.nan, math.inf, -math.inf, 1e6]),
    kind=st.sampled_from(["numpy", "torch", "torch", "list", "scalar", "none", "str"]),
)
def test_fuzz_actions(env, shape, dtype, value, poison, kind):
    COUNTS["actions"] += 1
    shape = (env.num_envs, *env.latent_shape) if shape == "ok" else shape
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        arr = np.full(shape, value, dtype=np.float64)
        if poison is not None and arr.size:
            arr.reshape(-1)[arr.size // 2] = poison
        arr = arr.astype(dtype)
    action = {"numpy": arr, "torch": torch.from_numpy(arr) if kind == "torch" else None, "list": arr.tolist(),
              "scalar": value, "none": None, "str": "x_t"}[kind]  # fmt: skip
    as_float = arr.astype(np.float64) if np.issubdtype(dtype, np.floating) else None
    valid = (
        kind in ("numpy", "torch") and shape == (env.num_envs, *env.latent_shape) and as_float is not None
        and bool(np.isfinite(as_float).all()) and bool((np.abs(as_float) <= env.action_bound).all())
    )  # fmt: skip
    env.reset(seed=0)
    try:
        obs, *_ = env.step(action)
    except Exception as exc:
        assert not valid, f"valid action refused: {exc}"
        _expect_clear_error(exc)
        COUNTS["actions/refused"] += 1
        return
    assert valid, f"invalid action accepted: kind={kind} shape={shape} dtype={dtype} value={value} poison={poison}"
    torch.testing.assert_close(obs["x_t"], torch.as_tensor(as_float, dtype=torch.float32))
    COUNTS["actions/accepted"] += 1


# ---------------------------------------------------------------------------------------- prompts
TEXT = st.one_of(
    st.just(""),
    st.text(max_size=40),  # arbitrary Unicode, incl. non-ASCII and surrogate-free control characters
    st.text(alphabet=st.characters(max_codepoint=31), max_size=20),  # control characters only
    st.sampled_from([MAX_PROMPT_LENGTH - 1, MAX_PROMPT_LENGTH, MAX_PROMPT_LENGTH + 1]).map(lambda n: "é" * n),
)
NOT_TEXT = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.binary(max_size=5))


def _prompts_valid(prompts, n: int) -> bool:
    return (
        isinstance(prompts, list) and len(prompts) == n
        and all(isinstance(p, str) and len(p) <= MAX_PROMPT_LENGTH for p in prompts)
    )  # fmt: skip


@settings(FUZZ, max_examples=60)
@given(prompts=st.sampled_from(["two", "two", "mixed", "text", "other"]).flatmap(lambda k: {
    "two": st.lists(TEXT, min_size=2, max_size=2),  # the right count: accepted unless a prompt is too long
    "mixed": st.lists(st.one_of(TEXT, NOT_TEXT), max_size=3),
    "text": TEXT,
    "other": NOT_TEXT,
}[k]))
def test_fuzz_reset_prompts(env, prompts):
    COUNTS["prompts/reset_options"] += 1
    valid = _prompts_valid(prompts, env.num_envs)
    try:
        obs, _ = env.reset(seed=1, options={"prompts": prompts})
    except Exception as exc:
        assert not valid, f"valid prompts refused: {exc}"
        _expect_clear_error(exc)
        COUNTS["prompts/reset_options/refused"] += 1
        return
    assert valid, f"invalid prompts accepted: {prompts!r:.200}"
    COUNTS["prompts/reset_options/accepted"] += 1
    assert obs["prompt"] == tuple(prompts)
    emb = env.family.condition(obs["prompt"])["encoder_hidden_states"]
    assert emb.shape[0] == env.num_envs and bool(torch.isfinite(emb).all())


@settings(FUZZ, max_examples=40)
@given(prompts=st.sampled_from(["text", "text", "mixed", "other"]).flatmap(lambda k: {
    "text": st.lists(TEXT, max_size=4),
    "mixed": st.lists(st.one_of(TEXT, NOT_TEXT), max_size=4),
    "other": NOT_TEXT,
}[k]))
def test_fuzz_prompt_lists(env, prompts):
    COUNTS["prompts/lists"] += 1
    list_ok = isinstance(prompts, list) and len(prompts) > 0 and all(isinstance(p, str) for p in prompts)
    try:
        sampler = make_prompt_sampler(prompts)
    except Exception as exc:
        assert not list_ok, f"valid prompt list refused: {exc}"
        _expect_clear_error(exc)
        COUNTS["prompts/lists/refused"] += 1
        return
    assert list_ok, f"invalid prompt list accepted: {prompts!r:.200}"
    original = env.prompt_sampler
    env.prompt_sampler = sampler
    try:
        obs, _ = env.reset(seed=2)
        assert all(p in prompts for p in obs["prompt"])
        assert all(len(p) <= MAX_PROMPT_LENGTH for p in obs["prompt"])
        COUNTS["prompts/lists/accepted"] += 1
    except ValueError as exc:  # a drawn prompt longer than the observation space allows
        assert f"at most {MAX_PROMPT_LENGTH}" in str(exc)
        assert any(len(p) > MAX_PROMPT_LENGTH for p in prompts)
        COUNTS["prompts/lists/refused_at_reset"] += 1
    finally:
        env.prompt_sampler = original


# ---------------------------------------------------------------------------------------- configs
FIELD_VALUES = st.one_of(
    st.integers(-3, 3), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 0.0, -1, 1e-9, 1.0, math.nan, math.inf, None, True, "", "ddpo-is", "x"]),
)  # fmt: skip
NUMERIC_FIELDS = [
    "seed", "num_epochs", "reward_query_budget", "samples_per_epoch", "sample_batch_size", "train_batch_size",
    "micro_batch_size", "num_inner_epochs", "timestep_fraction", "learning_rate", "adam_beta1", "adam_beta2",
    "adam_weight_decay", "adam_epsilon", "max_grad_norm", "clip_range", "adv_clip_max", "per_prompt_buffer_size",
    "per_prompt_min_count", "rwr_beta", "rwr_sparse_quantile", "rwr_updates_per_epoch", "lora_rank", "guidance_scale",
    "eta", "num_steps", "save_every", "grid_every", "num_eval_prompts", "time_limit_s",
]  # fmt: skip


@settings(FUZZ, max_examples=300)
@given(
    changes=st.dictionaries(st.sampled_from(NUMERIC_FIELDS), FIELD_VALUES, min_size=1, max_size=3),
    algo=st.sampled_from(["ddpo-is", "ddpo-sf", "rwr", "rwr-sparse", "ppo", ""]),
)
def test_fuzz_config_validate(changes, algo):
    COUNTS["configs/validate"] += 1
    cfg = TrainConfig(algo=algo, **changes)
    try:
        cfg.validate()
    except ValueError as exc:
        lines = str(exc).splitlines()
        assert lines[0] == "invalid training config:" and len(lines) > 1
        assert all(_says_what_to_do(line) for line in lines[1:]), str(exc)
        COUNTS["configs/refused"] += 1
        return
    COUNTS["configs/accepted"] += 1
    # Accepted: the values the trainer relies on really hold.
    for name in ("num_epochs", "samples_per_epoch", "sample_batch_size", "train_batch_size", "micro_batch_size"):
        assert isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1, name
    assert cfg.samples_per_epoch % cfg.sample_batch_size == 0
    assert math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0
    assert cfg.eta is None or (math.isfinite(cfg.eta) and cfg.eta > 0)
    assert cfg.num_steps is None or cfg.num_steps >= 1
    assert cfg.seed >= 0 and 0 < cfg.timestep_fraction <= 1


def _small_cfg(tiny_sd, run_dir, **kw) -> TrainConfig:
    base = dict(env_id="Denoise-SD14-Incompressibility-v0", algo="ddpo-is", num_epochs=2, samples_per_epoch=2,
                sample_batch_size=2, train_batch_size=2, micro_batch_size=16, num_steps=2, learning_rate=1e-3,
                env_kwargs=dict(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog"]),
                run_dir=str(run_dir), progress=False, per_prompt_min_count=2, per_prompt_buffer_size=8,
                num_eval_prompts=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(num_steps=5000), "exceeds the scheduler's 1000 training timesteps"),
        (dict(env_id="Denoise-Nope-v0"), "unknown env id"),
        (dict(algo="ppo"), "algo='ppo': expected one of"),
        (dict(eta=0.0), "eta=0.0"),
        (dict(samples_per_epoch=0), "samples_per_epoch=0: expected a positive integer"),
        (dict(env_kwargs=dict(model="/nonexistent/model", height=16, width=16)), "nonexistent"),
    ],
)
def test_configs_only_the_env_can_judge_are_refused_clearly(tiny_sd, tmp_path, changes, match):
    COUNTS["configs/trainer"] += 1
    with pytest.raises((ValueError, OSError), match=match) as info:
        Trainer(_small_cfg(tiny_sd, tmp_path / "run", **changes))
    assert not isinstance(info.value, (KeyError, TypeError, AttributeError, IndexError))
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------- checkpoints
class _SwitchableReward:
    """JPEG-free stand-in reward (mean brightness); can be told to raise or return NaN."""

    def __init__(self):
        self.mode = "ok"

    def __call__(self, images, prompts):
        if self.mode == "raise":
            raise ZeroDivisionError("the reward server divided by zero")
        r = images.float().mean(dim=(1, 2, 3))
        return (torch.full_like(r, math.nan) if self.mode == "nan" else r), {}

    def __repr__(self):
        return "SwitchableReward()"


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """A trainer one epoch into a run (checkpoint ckpt-0001 written) with a switchable reward."""
    reward = _SwitchableReward()
    cfg = _small_cfg(tiny_sd, tmp_path_factory.mktemp("fuzz_run") / "run")
    cfg.env_kwargs["reward"] = reward
    trainer = Trainer(cfg)
    trainer.train_epoch()
    assert (trainer.ckpt_dir / "latest").read_text() == "ckpt-0001"
    return trainer, reward


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}  # fmt: skip


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(FUZZ, max_examples=40)
@given(
    target=st.sampled_from(["weights.safetensors", "optimizer.safetensors", "state.json", "latest"]),
    mutation=st.sampled_from(["truncate", "garbage", "foreign", "json", "delete"]),
    fraction=st.floats(0, 0.999),
    blob=st.binary(max_size=64),
    doc=JSONISH,
)
def test_fuzz_damaged_checkpoints_are_refused_without_touching_the_run(trained, tmp_path_factory, target, mutation,
                                                                       fraction, blob, doc):  # fmt: skip
    trainer, _ = trained
    COUNTS[f"checkpoints/{mutation}"] += 1
    run = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(trainer.run_dir, run)
    ckpts = run / "checkpoints"
    path = ckpts / "latest" if target == "latest" else ckpts / (ckpts / "latest").read_text() / target
    data = path.read_bytes()
    if mutation == "truncate":
        path.write_bytes(data[: int(len(data) * fraction)])
    elif mutation == "garbage":
        path.write_bytes(blob)
    elif mutation == "foreign":  # a valid safetensors file of some other model
        save_file({"encoder.layer.0.weight": torch.zeros(3, 2), "step": torch.ones(1)}, str(path))
    elif mutation == "json":
        path.write_text(json.dumps(doc))
    else:
        path.unlink()
    before = _snapshot(run)
    original = (trainer.run_dir, trainer.ckpt_dir)
    trainer.run_dir, trainer.ckpt_dir = run, ckpts
    try:
        with pytest.raises(ValueError) as info:
            trainer._load_checkpoint()
    finally:
        trainer.run_dir, trainer.ckpt_dir = original
    assert "expected" in str(info.value)
    assert _snapshot(run) == before  # a refused resume never changes the run directory


def test_resume_from_truncated_checkpoint_is_refused_end_to_end(trained, tmp_path):
    trainer, _ = trained
    COUNTS["checkpoints/end_to_end"] += 1
    run = tmp_path / "run"
    shutil.copytree(trainer.run_dir, run, ignore=shutil.ignore_patterns(".lock"))  # not the live trainer's lock
    weights = run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = _snapshot(run)
    cfg = trainer.cfg.replace(run_dir=str(run), env_kwargs={**trainer.cfg.env_kwargs, "reward": "jpeg_compressibility"})
    with pytest.raises(ValueError, match="unreadable"):
        Trainer(cfg, resume=True)
    assert _snapshot(run) == before


# ---------------------------------------------------------------------------------------- rewards
def _bad_reward(kind: str, shape: tuple[int, ...]):
    def reward(images, prompts):
        n = len(prompts)
        if kind == "raise":
            raise KeyError("missing column")
        if kind == "raise_torch":
            return torch.ones(2, 3) @ torch.ones(4, 5)  # a shape error from inside torch
        if kind == "nan":
            return torch.full((n,), math.nan), {}
        if kind == "inf":
            return torch.tensor([math.inf] * n), {}
        if kind == "shape":
            return torch.zeros(shape), {}
        if kind == "type":
            return "high reward", {}
        if kind == "tuple3":
            return torch.zeros(n), {}, None
        if kind == "numpy":
            return np.zeros(n), {}
        return [0.5] * n  # a bare list: accepted
    reward.__qualname__ = f"bad_reward[{kind}]"
    return reward


@pytest.mark.parametrize("kind", ["raise", "raise_torch", "nan", "inf", "shape", "type", "tuple3", "numpy", "list"])
@settings(FUZZ, max_examples=5)
@given(shape=st.lists(st.integers(0, 3), max_size=3).map(tuple) | st.just((2,)))
def test_fuzz_reward_functions(env, kind, shape):
    COUNTS[f"rewards/{kind}"] += 1
    original = env.reward_fn
    env.reward_fn = _bad_reward(kind, shape)
    try:
        obs, _ = env.reset(seed=3)
        obs, *_ = env.step(obs["x_t"].clone())
        try:
            _, rewards, terminated, _, info = env.step(obs["x_t"].clone())
        except Exception as exc:
            if kind in ("raise", "raise_torch"):
                assert isinstance(exc, RewardError) and "bad_reward" in str(exc), f"{type(exc).__name__}: {exc}"
            else:
                refusable = kind in ("type", "tuple3") or (kind == "shape" and shape != (env.num_envs,))
                assert refusable, f"{kind}: {type(exc).__name__}: {exc}"
                _expect_clear_error(exc)
            return
        assert kind in ("nan", "inf", "numpy", "list") or (kind == "shape" and shape == (env.num_envs,)), kind
        assert rewards.shape == (env.num_envs,) and bool(terminated.all())
        if kind == "nan":
            assert bool(rewards.isnan().all())  # passed through; the trainer skips the update (below)
    finally:
        env.reward_fn = original


def test_reward_raising_in_training_names_it_and_leaves_the_run_resumable(trained):
    trainer, reward = trained
    COUNTS["rewards/trainer_raise"] += 1
    before = _snapshot(trainer.run_dir)
    epoch = trainer.epoch
    reward.mode = "raise"
    try:
        with pytest.raises(RewardError, match="SwitchableReward.*ZeroDivisionError: the reward server divided"):
            trainer.train_epoch()
    finally:
        reward.mode = "ok"
    assert trainer.epoch == epoch and _snapshot(trainer.run_dir) == before
    trainer._load_checkpoint()  # still resumable from the last checkpoint
    assert trainer.epoch == epoch


def test_nan_reward_in_training_skips_the_update(trained):
    trainer, reward = trained
    COUNTS["rewards/trainer_nan"] += 1
    weights = {k: v.clone() for k, v in trainer.trainable_state().items()}
    reward.mode = "nan"
    try:
        metrics = trainer.train_epoch()
    finally:
        reward.mode = "ok"
    assert metrics["charts/skipped_update"] == 1 and metrics["charts/nonfinite_rewards"] == 2
    assert all(torch.equal(weights[k], v) for k, v in trainer.trainable_state().items())
