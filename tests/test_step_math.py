"""The DDIM(η) step Gaussian against diffusers' DDIMScheduler and torch.distributions."""

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_env.step_math import (
    check_std,
    classifier_free_guidance,
    ddim_step_gaussian,
    previous_timestep,
    schedule_std,
    step_log_prob,
)


def _scheduler(**kw):
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return DDIMScheduler(**{**cfg, **kw})


def _tables(sched):
    return sched.alphas_cumprod.float(), torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float32)


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 4, 4, 6), (5, 2, 3, 3)])
@pytest.mark.parametrize("num_steps", [10, 50])
@pytest.mark.parametrize("clip", [False, True])
def test_mean_matches_ddim_scheduler(shape, num_steps, clip):
    sched = _scheduler(clip_sample=clip, clip_sample_range=1.0)
    sched.set_timesteps(num_steps)
    alphas, final = _tables(sched)
    g = torch.Generator().manual_seed(sum(shape) + num_steps)
    for t in sched.timesteps[[0, 1, len(sched.timesteps) // 2, -2, -1]]:
        x = torch.randn(shape, generator=g)
        eps = torch.randn(shape, generator=g)
        z = torch.randn(shape, generator=g)
        ref = sched.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        tb = torch.full((shape[0],), int(t))
        gauss = ddim_step_gaussian(
            eps, x, tb, previous_timestep(tb, 1000, num_steps), alphas, final, 1.0, 1.0 if clip else None
        )
        torch.testing.assert_close(gauss.mean, ref - gauss.std * z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gauss.mean + gauss.std * z, ref, atol=1e-5, rtol=1e-5)


def test_per_row_timesteps_equal_separate_calls():
    sched = _scheduler()
    sched.set_timesteps(20)
    alphas, final = _tables(sched)
    t = sched.timesteps[[0, 5, 19]]
    x, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    batched = ddim_step_gaussian(eps, x, t, previous_timestep(t, 1000, 20), alphas, final)
    for i in range(3):
        single = ddim_step_gaussian(eps[i : i + 1], x[i : i + 1], t[i : i + 1], previous_timestep(t[i : i + 1], 1000, 20), alphas, final)
        torch.testing.assert_close(batched.mean[i : i + 1], single.mean)
        torch.testing.assert_close(batched.std[i : i + 1], single.std)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_log_prob_matches_torch_normal(reduction):
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(4, 4, 5, 5, generator=g)
    std = torch.rand(4, 1, 1, 1, generator=g) + 0.05
    x = mean + std * torch.randn(4, 4, 5, 5, generator=g)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x)
    if reduction == "sum":
        ref = ref.sum(dim=(1, 2, 3))
    elif reduction == "mean":
        ref = ref.mean(dim=(1, 2, 3))
    torch.testing.assert_close(step_log_prob(x, mean, std, reduction), ref, atol=1e-4, rtol=1e-5)


def test_gradient_flows_to_eps():
    sched = _scheduler()
    sched.set_timesteps(10)
    alphas, final = _tables(sched)
    t = torch.tensor([sched.timesteps[3]] * 2)
    eps = torch.randn(2, 4, 4, 4, requires_grad=True)
    x = torch.randn(2, 4, 4, 4)
    gauss = ddim_step_gaussian(eps, x, t, previous_timestep(t, 1000, 10), alphas, final)
    action = (gauss.mean + gauss.std * torch.randn_like(x)).detach()
    step_log_prob(action, gauss.mean, gauss.std).sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    assert torch.isfinite(eps.grad).all()


def test_eta_zero_raises():
    sched = _scheduler()
    sched.set_timesteps(10)
    alphas, final = _tables(sched)
    t = torch.tensor([sched.timesteps[0]])
    with pytest.raises(ValueError, match="eta"):
        ddim_step_gaussian(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), t, t - 100, alphas, final, eta=0.0)


def test_zero_std_raises_not_nan():
    sched = _scheduler(set_alpha_to_one=True)  # final step has σ = 0
    sched.set_timesteps(10)
    alphas, final = _tables(sched)
    t = sched.timesteps[-1:]
    gauss = ddim_step_gaussian(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), t, previous_timestep(t, 1000, 10), alphas, final)
    with pytest.raises(ValueError, match="zero"):
        step_log_prob(gauss.mean, gauss.mean, gauss.std)
    with pytest.raises(ValueError, match="zero"):
        check_std(schedule_std(sched.timesteps, previous_timestep(sched.timesteps, 1000, 10), alphas, final, 1.0))


def test_log_prob_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        step_log_prob(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), "max")


def test_classifier_free_guidance():
    u, c = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(classifier_free_guidance(u, c, 1.0), c)
    torch.testing.assert_close(classifier_free_guidance(u, c, 5.0), u + 5 * (c - u))
