"""NFT (DiffusionNFT): the loss against its closed form, the families' x̂_0, training on both families, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.config import TrainConfig, preset_config
from agents.nft import nft_loss, optimality
from agents.trainer import Trainer


# ------------------------------------------------------------------------------------------ the loss
class FlowToy:
    """A stand-in family with the flow form x̂_0 = x_t - σ v̂ (σ per row); the test's own formulas below."""

    def __init__(self, sigma):
        self.sigma = sigma

    def predicted_x0(self, x_t, t, prediction):
        return x_t - torch.as_tensor(self.sigma)[t].reshape(-1, 1, 1, 1) * prediction


def _toy(seed=0):
    """Rows with their own σ, x_0, x_t, target and r; the "network" v_θ = θ_0 a + θ_1 b (numpy, float64)."""
    rng = np.random.default_rng(seed)
    n, shape = 3, (2, 2, 3)
    return dict(sigma=np.array([0.2, 0.5, 0.9]), t=np.arange(n), x0=rng.normal(size=(n, *shape)),
                x_t=rng.normal(size=(n, *shape)), target=rng.normal(size=(n, *shape)), r=np.array([0.1, 0.5, 0.85]),
                a=rng.normal(size=(n, *shape)), b=rng.normal(size=(n, *shape)))  # fmt: skip


def _expected(toy, theta, theta_old, beta, adaptive):
    """The loss (mean over rows) and its gradient in θ, by formula: D is differentiated with its scale held."""
    a, b, sigma = toy["a"], toy["b"], toy["sigma"].reshape(-1, 1, 1, 1)
    v, v_old = theta[0] * a + theta[1] * b, theta_old[0] * a + theta_old[1] * b
    n, N = a.shape[0], a[0].size
    losses, grad = [], np.zeros(2)
    for sign, w in ((+1, toy["r"]), (-1, 1 - toy["r"])):  # v⁺ = v_old + β (v - v_old), v⁻ = v_old - β (v - v_old)
        vs = v_old + sign * beta * (v - v_old)
        if adaptive:
            e = toy["x_t"] - sigma * vs - toy["x0"]
            scale = np.abs(e).mean(axis=(1, 2, 3))
            D = (e**2).mean(axis=(1, 2, 3)) / scale
            dD_dv = 2 * e * (-sigma) / (N * scale.reshape(-1, 1, 1, 1))
        else:
            D = ((vs - toy["target"]) ** 2).mean(axis=(1, 2, 3))
            dD_dv = 2 * (vs - toy["target"]) / N
        losses.append(w * D / beta)
        # dv±/dθ_k = ±β basis_k
        grad += np.array([(w.reshape(-1, 1, 1, 1) * dD_dv * sign * beta * basis).sum() for basis in (a, b)]) / beta
    return float((losses[0] + losses[1]).mean()), grad / n


def _computed(toy, theta, theta_old, beta, adaptive):
    t64 = {k: torch.tensor(v) for k, v in toy.items()}
    th = torch.tensor(theta, requires_grad=True)
    v = th[0] * t64["a"] + th[1] * t64["b"]
    v_old = (theta_old[0] * t64["a"] + theta_old[1] * t64["b"]).detach()
    loss, d_pos, d_neg = nft_loss(FlowToy(t64["sigma"]), v, v_old, t64["x_t"], t64["t"], t64["x0"], t64["target"],
                                  t64["r"], beta, adaptive)  # fmt: skip
    (grad,) = torch.autograd.grad(loss.mean(), th)
    return float(loss.mean().detach()), grad.numpy(), d_pos.detach().numpy(), d_neg.detach().numpy()


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_nft_loss_and_its_gradient_are_the_closed_form(adaptive, beta):
    toy = _toy()
    theta, theta_old = np.array([0.7, -0.4]), np.array([0.2, 0.3])
    want_loss, want_grad = _expected(toy, theta, theta_old, beta, adaptive)
    loss, grad, _, _ = _computed(toy, theta, theta_old, beta, adaptive)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10)
    assert np.abs(want_grad).min() > 1e-3  # a gradient worth comparing


@pytest.mark.parametrize("adaptive", [True, False])
def test_at_the_old_weights_the_gradient_is_2r_minus_1_times_that_of_d_whatever_beta(adaptive):
    """θ = θ_old: v⁺ = v⁻ = v_old, so D⁺ = D⁻ = D(v_old), the loss is mean D / β and its gradient is
    mean (2r - 1) ∂D/∂v ∂v/∂θ (D's scale held) for every β."""
    toy = _toy(1)
    theta = np.array([0.5, 0.8])
    a, b, sigma = toy["a"], toy["b"], toy["sigma"].reshape(-1, 1, 1, 1)
    v = theta[0] * a + theta[1] * b
    N = a[0].size
    if adaptive:
        e = toy["x_t"] - sigma * v - toy["x0"]
        D = (e**2).mean(axis=(1, 2, 3)) / np.abs(e).mean(axis=(1, 2, 3))
        dD_dv = -2 * sigma * e / (N * np.abs(e).mean(axis=(1, 2, 3)).reshape(-1, 1, 1, 1))
    else:
        D = ((v - toy["target"]) ** 2).mean(axis=(1, 2, 3))
        dD_dv = 2 * (v - toy["target"]) / N
    weight = (2 * toy["r"] - 1).reshape(-1, 1, 1, 1)
    want = np.array([(weight * dD_dv * basis).sum() for basis in (a, b)]) / len(D)
    for beta in (1.0, 0.3, 2.0):
        loss, grad, d_pos, d_neg = _computed(toy, theta, theta, beta, adaptive)
        np.testing.assert_allclose(d_pos, D, rtol=1e-12)
        np.testing.assert_allclose(d_neg, D, rtol=1e-12)
        assert loss == pytest.approx(D.mean() / beta, rel=1e-12)
        np.testing.assert_allclose(grad, want, rtol=1e-10)


def test_optimality_is_half_plus_half_the_clipped_group_advantage():
    prompts = ["a", "a", "b", "b", "b", "b"]
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 0.0, 40.0])
    # group a: A = ±1; group b: mean 10, population std √300, A = -10/√300 (×3) and 30/√300 = √3
    r = optimality(prompts, rewards, adv_clip_max=1.5).numpy()
    want = 0.5 + 0.5 * np.clip(np.array([-1, 1, -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3),
                                         math.sqrt(3)]) / 1.5, -1, 1)  # fmt: skip
    np.testing.assert_allclose(r, want, atol=1e-4)  # the group std carries an ε of 1e-4
    assert r[-1] == 1.0  # √3 / 1.5 > 1: clipped


# ------------------------------------------------------------------------------------------ x̂_0 of the families
def _round_trip(family, t):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(t), *family.latent_shape(16, 16), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t, target = family.noised(x0, t, noise)
    torch.testing.assert_close(family.predicted_x0(x_t, t, target), x0, rtol=1e-4, atol=2e-5)
    return x0, x_t, target


def test_predicted_x0_of_sd1_inverts_the_forward_process(tiny_sd):
    from diffusion_env.models import SD1Family

    family = SD1Family.load(tiny_sd)
    t = torch.tensor([0, 1, 250, 500, 999])
    x0, x_t, target = _round_trip(family, t)
    # off the target by δ: x̂_0 moves by -√(1-ᾱ)/√ᾱ δ (ᾱ from the scheduler's own betas)
    betas = family.scheduler.betas.double()
    alpha_bar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    delta = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    moved = family.predicted_x0(x_t, t, target + delta) - family.predicted_x0(x_t, t, target)
    torch.testing.assert_close(moved.double(), -((1 - alpha_bar) / alpha_bar).sqrt() * delta, rtol=1e-4, atol=1e-5)


def test_predicted_x0_of_sd3_inverts_the_forward_process(tiny_sd3):
    from diffusion_env.models import SD3Family

    family = SD3Family.load(tiny_sd3)
    family.set_schedule(4, 0.7, 1.0)
    t = torch.cat([family.timesteps, torch.tensor([1, 333])])  # on the shifted schedule (σ 1, .9, .75, .5) and off it
    x0, x_t, target = _round_trip(family, t)
    sigma = torch.cat([family.sigmas[:-1], torch.tensor([0.001, 0.333])]).double().view(-1, 1, 1, 1)
    delta = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    moved = family.predicted_x0(x_t, t, target + delta) - family.predicted_x0(x_t, t, target)
    torch.testing.assert_close(moved.double(), -sigma * delta, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ training
def _cfg(model, run_dir, **kw) -> TrainConfig:
    base = dict(env_id="Denoise-SD14-Incompressibility-v0", algo="nft", num_epochs=2, samples_per_epoch=4,
                sample_batch_size=4, samples_per_prompt=2, train_batch_size=4, micro_batch_size=8, num_steps=2,
                nft_updates_per_epoch=2, learning_rate=1e-3, run_dir=str(run_dir), progress=False,
                per_prompt_min_count=2, per_prompt_buffer_size=8, num_eval_prompts=1,
                env_kwargs=dict(model=str(model), height=16, width=16, prompts=["a cat", "a dog", "a red circle"]))  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sd3"])
def test_nft_trains_both_families(model, request, tmp_path):
    kw = dict(eta=0.7, guidance_scale=4.5, lora_rank=2) if model == "tiny_sd3" else {}
    tr = Trainer(_cfg(request.getfixturevalue(model), tmp_path / "run", **kw))
    assert tr.env.family.name == ("sd3-flow" if model == "tiny_sd3" else "sd1-ddim")
    before = {k: v.clone() for k, v in tr.policy.trainable_state().items()}
    hist = tr.train()
    after = tr.policy.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter moved"
    for row in hist:
        losses = {k: v for k, v in row.items() if k.startswith("losses/")}
        assert all(math.isfinite(v) for v in losses.values()), losses
        assert row["losses/optimizer_steps"] == 2 and row["losses/skipped_steps"] == 0
        assert row["losses/grad_norm"] > 0
        # A group's advantages sum to 0 (|A| < A_max here: no clip), so r averages 0.5 (up to fp32 rounding of
        # nearly equal rewards)
        assert row["losses/r_mean"] == pytest.approx(0.5, abs=1e-3)
    tr.close()


def test_the_first_step_does_not_depend_on_beta(tiny_sd, tmp_path):
    """One optimizer step at θ = θ_old: D⁺ = D⁻, β × loss and the gradient are the same for every β."""
    rows = []
    for beta in (1.0, 0.25):
        tr = Trainer(_cfg(tiny_sd, tmp_path / f"run{beta}", num_epochs=1, nft_updates_per_epoch=1, nft_beta=beta))
        rows.append(tr.train()[0])
        tr.close()
    for row in rows:
        assert row["losses/positive_loss"] == pytest.approx(row["losses/negative_loss"], rel=1e-6)
    assert rows[0]["losses/policy_loss"] * 1.0 == pytest.approx(rows[1]["losses/policy_loss"] * 0.25, rel=1e-5)
    assert rows[0]["losses/grad_norm"] == pytest.approx(rows[1]["losses/grad_norm"], rel=1e-4)


# ------------------------------------------------------------------------------------------ config
def test_nft_config_refuses_bad_values_with_clear_messages():
    ok = dict(algo="nft", samples_per_prompt=2)
    TrainConfig(**ok).validate()
    for bad, match in ((dict(nft_beta=0.0), r"nft_beta=0.0: expected a finite number > 0"),
                       (dict(nft_beta=float("nan")), r"nft_beta=nan"),
                       (dict(nft_updates_per_epoch=0), r"nft_updates_per_epoch=0: expected a positive integer"),
                       (dict(samples_per_prompt=1), r"samples_per_prompt=1: NFT compares"),
                       (dict(train_timesteps="first:2"), r"NFT regresses final samples"),
                       (dict(samples_per_epoch=64, train_batch_size=128), r"train_batch_size=128 exceeds samples_per_epoch=64")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            TrainConfig(**{**ok, **bad}).validate()
    with pytest.raises(ValueError) as exc:
        TrainConfig(**ok, rwr_beta=0.5).validate()
    assert "'nft' has no setting 'rwr_beta'" in str(exc.value)
    assert all(f"'{name}'" in str(exc.value) for name in ("nft_beta", "nft_updates_per_epoch", "adaptive_weight",
                                                          "guided"))  # fmt: skip


def test_nft_presets_validate():
    for preset in ("tiny", "sd14", "sd35"):
        cfg = preset_config(preset, "nft").validate()
        assert cfg.nft_beta == 1.0 and cfg.samples_per_prompt >= 2
    tiny = preset_config("tiny", "nft")
    assert (tiny.train_batch_size, tiny.nft_updates_per_epoch, tiny.learning_rate, tiny.samples_per_prompt) == (
        64, 8, 3e-5, 8)  # fmt: skip
