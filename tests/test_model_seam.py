"""The model seam: one family object serves env and policy; text encoded once per prompt; RWR per the paper."""

import types

import pytest
import torch
from conftest import make_env
from test_agents import _CaptureOptimizer

from agents import rwr
from agents.config import TrainConfig, preset_config
from agents.core import Rollout
from agents.evaluate import evaluate_policy
from agents.policy import GaussianDenoisingPolicy
from agents.trainer import Trainer
from diffusion_env.models import ModelFamily, SD1Family, load_family


def test_env_and_policy_share_one_family_and_neither_holds_the_other(tiny_sd):
    env = make_env(tiny_sd, num_envs=2)
    policy = GaussianDenoisingPolicy.from_env(env)
    assert isinstance(env.family, SD1Family) and policy.family is env.family
    assert not any(v is env for v in vars(policy).values())
    assert not hasattr(env, "encode_prompts")  # text conditioning is the family's, not the env's
    with pytest.raises(ValueError, match="expected a diffusion_env.models.ModelFamily"):
        GaussianDenoisingPolicy(policy.network, env)


def test_load_family_detects_the_layout_and_refuses_another(tiny_sd, tmp_path):
    assert isinstance(load_family(tiny_sd), SD1Family)
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_family(tmp_path, family="sd1-ddim")
    with pytest.raises(ValueError, match="not registered; expected one of"):
        load_family(tiny_sd, family="flux")


def test_text_encoder_runs_once_per_distinct_prompt_in_a_run(tiny_sd, tmp_path, monkeypatch):
    """Sampling, training (every micro-batch), grids and evaluation: each prompt reaches an encoder once.

    Every CLIPTextModel call counts (the class is patched), so a grid or evaluation env that loaded its own
    text encoder would be seen too."""
    from transformers import CLIPTextModel

    prompts = ["a cat", "a dog", "a red circle"]
    cfg = TrainConfig(env_id="Denoise-SD14-Incompressibility-v0", algo="ddpo-is", num_epochs=2, samples_per_epoch=8,
                      sample_batch_size=4, train_batch_size=4, micro_batch_size=3, num_steps=2, num_eval_prompts=2,
                      env_kwargs=dict(model=str(tiny_sd), height=16, width=16, prompts=prompts),
                      run_dir=str(tmp_path / "run"), progress=False)  # fmt: skip
    encoded = []
    forward = CLIPTextModel.forward

    def counting_forward(self, input_ids=None, *args, **kwargs):
        encoded.extend(input_ids.tolist())
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(CLIPTextModel, "forward", counting_forward)
    trainer = Trainer(cfg)
    trainer.train()  # grids before and after, two epochs of sampling and training
    evaluate_policy(cfg, trainer.policy, prompts, num_samples=4, batch_size=2)
    trainer.close()
    rows = [tuple(r) for r in encoded]
    assert len(rows) == len(set(rows)), f"a prompt was encoded twice ({len(rows)} encodings of {len(set(rows))})"
    assert 2 <= len(rows) <= len(prompts) + 1  # the prompts and the empty (unconditional) prompt


# ---------------------------------------------------------------------------------------------- RWR
class _ToyNet(torch.nn.Module):
    """pred(x, t, c) = θ ⊙ x + w · (a few of c's first token features): conditional ≠ unconditional."""

    def __init__(self, shape):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.theta = torch.nn.Parameter(0.5 + 0.1 * torch.randn(shape, generator=g))
        self.w = torch.nn.Parameter(torch.tensor(0.7))
        self.dtype = torch.float32

    def forward(self, x, t, encoder_hidden_states=None):
        c = encoder_hidden_states[:, 1:3, :4].sum(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return types.SimpleNamespace(sample=self.theta * x + self.w * c)


def _expected_rwr_grads(net, family, rollout, beta, guidance, seed):
    """The per-prompt-softmax-weighted denoising loss written out directly, and its gradient by autograd.

    The draws follow the documented order (agents/rwr.py, ModelFamily.training_inputs): a permutation of the
    samples, then the training timesteps, then the noise, from one generator.
    """
    B = rollout.latents.shape[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(B, generator=g)
    t = torch.randint(0, family.num_train_timesteps, (B,), generator=g)
    noise = torch.randn((B, *rollout.latents.shape[2:]), generator=g)
    prompts = [rollout.prompts[i] for i in idx.tolist()]
    r = rollout.rewards[idx]
    weights = torch.empty(B)
    for p in set(prompts):
        ix = torch.tensor([i for i, q in enumerate(prompts) if q == p])
        e = torch.exp(beta * r[ix] - (beta * r[ix]).max())
        weights[ix] = e / e.sum()
    a = family.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * rollout.latents[idx, -1] + (1 - a).sqrt() * noise
    with torch.no_grad():
        cond = torch.cat([family.text_encoder(family._tokens([p])).last_hidden_state for p in prompts])
        uncond = family.text_encoder(family._tokens([""])).last_hidden_state.expand_as(cond)
    pred_c = net(x_t, t, encoder_hidden_states=cond).sample
    pred = pred_c
    if guidance != 1.0:
        pred_u = net(x_t, t, encoder_hidden_states=uncond).sample
        pred = pred_u + guidance * (pred_c - pred_u)
    loss = (weights / len(set(prompts)) * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).sum()
    return torch.autograd.grad(loss, [net.theta, net.w])


@pytest.mark.parametrize("cfg_training", [True, False])
def test_rwr_gradient_is_the_weighted_loss_on_the_guided_prediction(tiny_sd, cfg_training):
    env = make_env(tiny_sd, num_envs=1, num_steps=2)
    family = env.family
    net = _ToyNet(env.latent_shape)
    policy = GaussianDenoisingPolicy(net, family, guidance_scale=5.0)
    B, S = 6, 2
    g = torch.Generator().manual_seed(1)
    rollout = Rollout(prompts=("a cat", "a dog", "a cat", "a dog", "a cat", "a cat"),
                      latents=torch.randn(B, S + 1, *env.latent_shape, generator=g),
                      timesteps=torch.zeros(B, S, dtype=torch.long), log_probs=torch.zeros(B, S),
                      rewards=torch.tensor([0.1, -0.3, 0.5, 0.2, -0.2, 0.05]), images=torch.zeros(B, 3, 16, 16))  # fmt: skip
    cfg = TrainConfig(algo="rwr", rwr_beta=4.0, rwr_updates_per_epoch=1, samples_per_epoch=B, sample_batch_size=B,
                      train_batch_size=B, micro_batch_size=4, max_grad_norm=1e12, rwr_cfg_training=cfg_training)  # fmt: skip
    opt = _CaptureOptimizer(policy.trainable_parameters())
    rwr.update(policy, opt, rollout, torch.zeros(B), cfg, torch.Generator().manual_seed(9))
    guided = _expected_rwr_grads(net, family, rollout, 4.0, 5.0, 9)
    conditional = _expected_rwr_grads(net, family, rollout, 4.0, 1.0, 9)
    want, other = (guided, conditional) if cfg_training else (conditional, guided)
    for got, exp in zip(opt.grads, want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(opt.grads, other))


def test_rwr_weights_are_a_softmax_of_beta_times_reward_per_prompt():
    prompts = ("a", "b", "a", "a", "b")
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5, 3.0])
    adv = torch.tensor([5.0, -5.0, 0.0, 0.0, 0.0])  # ignored by the paper's weighting
    cfg = TrainConfig(algo="rwr", rwr_beta=2.0)
    w = rwr.rwr_weights(prompts, rewards, adv, cfg)
    ea = torch.exp(2.0 * torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(w[[0, 2, 3]], ea / ea.sum())
    eb = torch.exp(2.0 * torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(w[[1, 4]], eb / eb.sum())
    w_adv = rwr.rwr_weights(prompts, rewards, adv, cfg.replace(rwr_weighting="advantage"))
    assert w_adv[0] > 0.99  # the ablation weighs the normalised advantage instead
    with pytest.raises(ValueError, match="rwr_weighting='paper'"):
        cfg.replace(rwr_weighting="paper").validate()


def test_tiny_rwr_preset_sets_beta_for_the_task_reward_scale():
    comp = preset_config("tiny", "rwr", env_id="Denoise-Tiny-Compressibility-v0")
    align = preset_config("tiny", "rwr", env_id="Denoise-Tiny-PromptAlignment-v0")
    assert comp.rwr_beta > 1 and align.rwr_beta > 1  # not A.6's 0.2, which is for SD v1.4's reward scales
    assert preset_config("tiny", "rwr", env_id="Denoise-Tiny-Compressibility-v0", rwr_beta=0.5).rwr_beta == 0.5


def test_a_family_subclass_plugs_in_without_touching_agents(tiny_sd):
    """A family that changes the step (here: a deterministic mean shift) is what the policy then samples."""

    class Shifted(SD1Family):
        name = "shifted-test"

        def step_gaussian(self, prediction, x_t, t):
            g = super().step_gaussian(prediction, x_t, t)
            return g._replace(mean=g.mean + 1.0)

    base = load_family(tiny_sd)
    shifted = Shifted(base.scheduler, base.vae, base.text_encoder, base.tokenizer, model_path=base.model_path)
    assert isinstance(shifted, ModelFamily)
    env_a = make_env(tiny_sd, num_envs=2, model=base)
    env_b = make_env(tiny_sd, num_envs=2, model=shifted)
    net = base.load_network()
    pa, pb = GaussianDenoisingPolicy(net, env_a.family), GaussianDenoisingPolicy(net, env_b.family)
    obs, _ = env_a.reset(seed=0)
    with torch.no_grad():
        ma = pa.distribution(obs["x_t"], obs["t"], obs["prompt"]).mean
        mb = pb.distribution(obs["x_t"], obs["t"], obs["prompt"]).mean
    torch.testing.assert_close(mb - ma, torch.ones_like(ma))
