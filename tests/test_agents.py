"""Agents: PPO ratio at the first minibatch, REINFORCE gradient, RWR weights, resume, NaN guards, config checks."""

import json
import types

import numpy as np
import pytest
import torch
from conftest import make_env

from agents import ddpo_is, ddpo_sf
from agents.config import TrainConfig, preset_config
from agents.core import PerPromptStatTracker, RolloutBuffer, collect_rollout, make_optimizer, warmup_lr
from agents.policy import GaussianDenoisingPolicy
from agents.rwr import per_prompt_softmax
from agents.rwr_sparse import sparse_weights
from agents.trainer import Trainer


def _cfg(tiny_sd, tmp_path, **kw):
    base = dict(env_id="Denoise-SD14-Incompressibility-v0", algo="ddpo-is", num_epochs=2, samples_per_epoch=8,
                sample_batch_size=4, train_batch_size=4, micro_batch_size=16, num_steps=3, learning_rate=1e-3,
                env_kwargs=dict(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog"]),
                run_dir=str(tmp_path / "run"), progress=False, per_prompt_min_count=2, per_prompt_buffer_size=8)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_ppo_ratio_is_one_before_any_update(tiny_sd):
    env = make_env(tiny_sd, num_envs=4, num_steps=4)
    policy = GaussianDenoisingPolicy.from_env(env)
    ro = collect_rollout(env, policy, seed=0, generator=torch.Generator().manual_seed(0))
    # Flattened pairs from different samples and timesteps, in a batch of a different size than collection.
    sample_idx = torch.tensor([3, 0, 2, 1, 1, 0])
    step_idx = torch.tensor([0, 3, 1, 2, 0, 1])
    batch = RolloutBuffer(ro, ro.rewards, 6).pairs(sample_idx, step_idx, ro.rewards[sample_idx], 6)
    with torch.no_grad():
        log_ratio = policy.log_prob(batch.obs, batch.actions) - batch.old_log_probs
    assert log_ratio.abs().max() < 1e-6
    cfg = TrainConfig(samples_per_epoch=4, sample_batch_size=4, train_batch_size=4, micro_batch_size=4)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
    metrics = ddpo_is.update(policy, opt, ro, torch.randn(4), cfg, torch.Generator().manual_seed(1))
    assert metrics["losses/ratio_dev_first"] < 1e-6
    assert metrics["losses/optimizer_steps"] == 1


class _ConstantEpsUNet(torch.nn.Module):
    """ε_θ(x, t, c) = θ: the policy mean is affine in θ, so the REINFORCE gradient has a closed form."""

    def __init__(self, shape):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
        self.dtype = torch.float32

    def forward(self, x, t, encoder_hidden_states=None):
        return types.SimpleNamespace(sample=self.theta.expand_as(x))


class _CaptureOptimizer:
    def __init__(self, params):
        self.params, self.grads = list(params), None
        self.param_groups = [{"params": self.params, "lr": 1.0}]  # no warm-up keys: optimizer_step leaves lr alone

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ddpo_sf_gradient_equals_analytic_reinforce(tiny_sd, reduction):
    env = make_env(tiny_sd, num_envs=5, num_steps=1)  # one-step MDP: x_T → x_0
    unet = _ConstantEpsUNet(env.latent_shape)
    policy = GaussianDenoisingPolicy(unet, env.family, reduction=reduction)
    ro = collect_rollout(env, policy, seed=1, generator=torch.Generator().manual_seed(2))
    adv = torch.tensor([1.0, -0.5, 2.0, 0.0, -1.5])
    cfg = TrainConfig(samples_per_epoch=5, sample_batch_size=5, train_batch_size=5, micro_batch_size=2, max_grad_norm=1e12)
    opt = _CaptureOptimizer(policy.trainable_parameters())
    ddpo_sf.update(policy, opt, ro, adv, cfg, torch.Generator().manual_seed(0))
    # Closed form: μ = √ᾱ' (x - √(1-ᾱ) θ)/√ᾱ + √(1-ᾱ'-σ²) θ, so ∂μ/∂θ = c (a scalar) and
    # ∇_θ log N(a; μ, σ²) = c (a - μ) / σ² per dimension.
    t = int(env.timesteps[0])
    a_t = float(env.family.alphas_cumprod[t])
    a_prev = float(env.family.final_alpha_cumprod)  # the only step goes to the end
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    c = -np.sqrt(a_prev) * np.sqrt(1 - a_t) / np.sqrt(a_t) + np.sqrt(1 - a_prev - var)
    theta = unet.theta.detach().double()
    x, a = ro.latents[:, 0].double(), ro.latents[:, 1].double()
    mu = np.sqrt(a_prev) * (x - np.sqrt(1 - a_t) * theta) / np.sqrt(a_t) + np.sqrt(1 - a_prev - var) * theta
    score = c * (a - mu) / var  # [B, C, H, W]
    if reduction == "mean":
        score = score / theta.numel()
    expected = -(adv.double().reshape(-1, 1, 1, 1) * score).mean(dim=0)
    # fp32 gradients vs a float64 closed form: agree to 1e-4 of the gradient's scale.
    scale = float(expected.abs().max())
    torch.testing.assert_close(opt.grads[0].double(), expected, rtol=1e-4, atol=1e-4 * scale)
    assert float((opt.grads[0].double() - expected).norm() / expected.norm()) < 1e-5


def test_rwr_weights_sum_to_one_per_prompt():
    prompts = ["a", "b", "a", "c", "b", "a"]
    w = per_prompt_softmax(prompts, 0.2 * torch.tensor([1.0, 2.0, -1.0, 0.5, 0.0, 3.0]))
    for p in set(prompts):
        idx = [i for i, q in enumerate(prompts) if q == p]
        assert abs(float(w[idx].sum()) - 1.0) < 1e-6
    assert w[5] > w[0] > w[2]  # higher reward, higher weight within a prompt


def test_rwr_sparse_keeps_top_decile_per_prompt():
    tracker = PerPromptStatTracker(buffer_size=100, min_count=10)
    g = torch.Generator().manual_seed(0)
    prompts = ["cat"] * 50 + ["dog"] * 50
    rewards = torch.cat([torch.randn(50, generator=g), 10 + torch.randn(50, generator=g)])
    tracker.update(prompts, rewards)
    w = sparse_weights(prompts, rewards, tracker, 0.9)
    for lo, group in ((0, rewards[:50]), (50, rewards[50:])):
        kept = w[lo : lo + 50] > 0
        assert int(kept.sum()) == 5  # top 10% of 50
        assert float(group[kept].min()) >= float(group[~kept].max())
        assert abs(float(w[lo : lo + 50].sum()) - 1.0) < 1e-6


def test_per_prompt_tracker_falls_back_to_batch_stats():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    adv = tracker.update(["a", "b"], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)
    tracker.update(["a", "a"], torch.tensor([2.0, 3.0]))  # "a" now has 3 rewards: 1, 2, 3
    adv = tracker.update(["a", "b"], torch.tensor([2.0, 0.0]))  # "a": buffer 1,2,3,2
    buf = np.array([1.0, 2.0, 3.0, 2.0])
    assert abs(float(adv[0]) - (2.0 - buf.mean()) / (buf.std() + 1e-6)) < 1e-5


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "charts/samples_per_s"} for r in rows]


@pytest.mark.parametrize("warmup", [0, 50])  # 50: every step of the run is in the warm-up, resumed mid-way
def test_resume_equals_uninterrupted(tiny_sd, tmp_path, warmup):
    full = Trainer(_cfg(tiny_sd, tmp_path / "a", num_epochs=3, lr_warmup_steps=warmup))
    full_hist = full.train()
    part = Trainer(_cfg(tiny_sd, tmp_path / "b", num_epochs=2, lr_warmup_steps=warmup))
    part.train()
    resumed = Trainer(_cfg(tiny_sd, tmp_path / "b", num_epochs=3, lr_warmup_steps=warmup), resume=True)
    assert resumed.epoch == 2
    resumed.train()
    rows = [json.loads(line) for line in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert _strip(rows) == _strip(full_hist)
    for (n, p), (_, q) in zip(full.policy.network.named_parameters(), resumed.policy.network.named_parameters()):
        assert torch.equal(p, q), n


def test_lr_warmup_rises_linearly_over_applied_steps_then_holds():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer([p], TrainConfig(learning_rate=0.2, lr_warmup_steps=4))
    used = []
    for _ in range(6):
        p.grad = torch.ones(3)
        warmup_lr(opt)
        used.append(opt.param_groups[0]["lr"])
        opt.step()
    assert used == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    plain = make_optimizer([torch.nn.Parameter(torch.zeros(3))], TrainConfig(learning_rate=0.2))
    warmup_lr(plain)
    assert plain.param_groups[0]["lr"] == 0.2 and "lr_warmup_steps" not in plain.param_groups[0]
    with pytest.raises(ValueError, match="lr_warmup_steps=-1: expected >= 0"):
        TrainConfig(lr_warmup_steps=-1).validate()


def test_training_changes_weights_and_writes_run_dir(tiny_sd, tmp_path):
    tr = Trainer(_cfg(tiny_sd, tmp_path, num_epochs=1, algo="rwr"))
    before = {n: p.clone() for n, p in tr.policy.network.named_parameters()}
    tr.train()
    assert any(not torch.equal(before[n], p) for n, p in tr.policy.network.named_parameters())
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "grid_before.png", "grid_after.png", "reward_curve.png"):
        assert (run / name).exists(), name
    latest = (run / "checkpoints" / "latest").read_text()
    assert (run / "checkpoints" / latest / "weights.safetensors").exists()


def test_trainer_sets_the_configs_threads(tiny_sd, tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Trainer(_cfg(tiny_sd, tmp_path, threads=1)).close()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_nan_reward_never_reaches_weights(tiny_sd, tmp_path):
    def nan_reward(images, prompts):
        r = torch.ones(len(prompts))
        r[0] = float("nan")
        return r, {}

    cfg = _cfg(tiny_sd, tmp_path, num_epochs=1)
    cfg.env_kwargs["reward"] = nan_reward
    tr = Trainer(cfg)
    before = {n: p.clone() for n, p in tr.policy.network.named_parameters()}
    hist = tr.train()
    assert hist[0]["charts/skipped_update"] == 1 and hist[0]["charts/nonfinite_rewards"] == 2
    assert all(torch.equal(before[n], p) for n, p in tr.policy.network.named_parameters())


def test_nan_loss_step_is_skipped(tiny_sd):
    env = make_env(tiny_sd, num_envs=4)
    policy = GaussianDenoisingPolicy.from_env(env)
    ro = collect_rollout(env, policy, seed=0, generator=torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in policy.network.named_parameters()}
    cfg = TrainConfig(samples_per_epoch=4, sample_batch_size=4, train_batch_size=4)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    metrics = ddpo_is.update(policy, opt, ro, torch.tensor([1.0, float("nan"), 0.0, 1.0]), cfg, torch.Generator())
    assert metrics["losses/skipped_steps"] == 1 and metrics["losses/optimizer_steps"] == 0
    assert all(torch.equal(before[n], p) for n, p in policy.network.named_parameters())


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(samples_per_epoch=64, train_batch_size=24), "does not divide"),
        (dict(samples_per_epoch=60, sample_batch_size=16), "multiple"),
        (dict(timestep_fraction=0.0), "timestep_fraction"),
        (dict(eta=0.0), "eta"),
        (dict(algo="ppo2"), "algo"),
        (dict(algo="ddpo-sf", num_inner_epochs=2), "'ddpo-sf' has no setting 'num_inner_epochs'"),
        (dict(lora_rank=0), "lora_rank"),
        (dict(attention="flash"), "attention=.flash.: expected .sdpa. or .math."),
    ],
)
def test_config_refuses_nonsense(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes).validate()


def test_presets_are_valid():
    for preset in ("tiny", "sd14", "sd35"):
        for algo in ("ddpo-is", "ddpo-sf", "grpo", "rwr", "rwr-sparse"):
            preset_config(preset, algo).validate()
    sd = preset_config("sd14", "ddpo-is")
    assert sd.samples_per_epoch == 256 and sd.train_batch_size == 64 and sd.lora_rank == 4
    assert sd.learning_rate == 1e-5 and sd.adam_weight_decay == 1e-4


def test_lora_trains_only_adapters(tiny_sd):
    env = make_env(tiny_sd, num_envs=2)
    policy = GaussianDenoisingPolicy.from_env(env, lora_rank=2)
    names = [n for n, p in policy.network.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert len(names) < len(list(policy.network.parameters()))


def test_async_rewards_train_identically(tiny_sd, tmp_path):
    hist = {}
    for flag in (False, True):
        cfg = _cfg(tiny_sd, tmp_path / str(flag), num_epochs=2, async_rewards=flag)
        hist[flag] = _strip(Trainer(cfg).train())
    assert hist[False] == hist[True]


def test_samples_per_prompt_repeats_prompts(tiny_sd, tmp_path):
    cfg = _cfg(tiny_sd, tmp_path, num_epochs=1, samples_per_prompt=2, algo="rwr",
               env_kwargs=dict(model=str(tiny_sd), height=16, width=16, prompts=[f"p{i}" for i in range(50)]))
    tr = Trainer(cfg)
    rollout = tr.collect(0)
    prompts = rollout.prompts
    assert len(prompts) == 8 and all(prompts[i] == prompts[i + 1] for i in range(0, 8, 2))
    assert len(set(prompts)) > 1
    assert tr.collect(0).prompts == prompts  # seeded by (seed, epoch, batch)


def test_time_limit_stops_before_an_epoch_that_would_overrun(tiny_sd, tmp_path, monkeypatch):
    """With 10 s epochs and a 25 s limit, two epochs run (ending at 20 s), not a third ending at 30 s; the
    stop reason names the time limit, not the epochs."""
    import agents.trainer as trainer_mod
    from agents.progress import describe_stop

    clock = [0.0]
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: clock[0])
    tr = Trainer(_cfg(tiny_sd, tmp_path, num_epochs=5, time_limit_s=25.0))
    real_epoch = tr.train_epoch

    def ten_second_epoch():
        out = real_epoch()
        clock[0] += 10.0
        return out

    monkeypatch.setattr(tr, "train_epoch", ten_second_epoch)
    tr.train()
    assert tr.epoch == 2 and clock[0] <= 25.0 and tr.stop_reason == "time_limit_s"
    text = describe_stop(tr.stop_reason, tr.cfg, tr.epoch, tr.reward_queries, tr.last_epoch_s)
    assert "time limit" in text and "2 of --num-epochs 5" in text
