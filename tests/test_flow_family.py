"""The flow-matching family (SD3 layout): step log-probs against the SDE formula on diffusers' sigmas, the
ODE sampler against diffusers' pipeline, text conditioning against the pipeline's, and the agents on it."""

import math

import pytest
import torch
from conftest import make_env

from agents.core import RolloutBuffer, collect_rollout
from agents.policy import GaussianDenoisingPolicy
from diffusion_env.models import SD3CPSFamily, SD3Family, load_family
from diffusion_env.step_math import step_log_prob

STEPS, A = 6, 0.7


def _scheduler_sigmas(path, steps):
    """σ_0 … σ_n straight from diffusers' scheduler (float64), not from the family's tables."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    sched.set_timesteps(steps)
    return sched.sigmas.double(), sched


def _sde_log_prob(x, v, x_next, sigma, sigma_next, a, sigma_max):
    """log N(x_next; μ, s² I) per sample, summed, from Flow-GRPO's SDE written out in float64."""
    x, v, x_next = x.double(), v.double(), x_next.double()
    g = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    dt = sigma_next - sigma
    mean = x * (1 + g**2 / (2 * sigma) * dt) + v * (1 + g**2 * (1 - sigma) / (2 * sigma)) * dt
    s = g * math.sqrt(-dt)
    return (-((x_next - mean) ** 2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def _cps_log_prob(x, v, x_next, sigma, sigma_next, a):
    x, v, x_next = x.double(), v.double(), x_next.double()
    s = sigma_next * math.sin(a * math.pi / 2)
    mean = (1 - sigma_next) * (x - sigma * v) + math.sqrt(sigma_next**2 - s**2) * (x + (1 - sigma) * v)
    return (-((x_next - mean) ** 2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


@pytest.mark.parametrize("cls", [SD3Family, SD3CPSFamily])
def test_step_log_prob_equals_the_sde_formula_on_diffusers_sigmas(tiny_sd3, cls):
    family = cls.load(tiny_sd3)
    family.set_schedule(STEPS, A, 1.0)
    sigmas, _ = _scheduler_sigmas(tiny_sd3, STEPS)
    assert family.timesteps.tolist() == [round(1000 * float(s)) for s in sigmas[:-1]]
    gen = torch.Generator().manual_seed(0)
    shape = (3, 16, 8, 8)
    for i, t in enumerate(family.timesteps):
        x, v, x_next = (torch.randn(shape, generator=gen) for _ in range(3))
        gauss = family.step_gaussian(v, x, t.expand(3))
        got_sum = step_log_prob(x_next, gauss.mean, gauss.std, "sum").double()
        got_mean = step_log_prob(x_next, gauss.mean, gauss.std, "mean").double()
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if cls is SD3CPSFamily and sigma_next > 0:
            want = _cps_log_prob(x, v, x_next, sigma, sigma_next, A)
        else:  # the SDE (and CPS's last step, which falls back to it)
            want = _sde_log_prob(x, v, x_next, sigma, sigma_next, A, float(sigmas[1]))
        torch.testing.assert_close(got_sum, want, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(got_mean, want / x[0].numel(), rtol=1e-5, atol=1e-5)


def test_rows_at_different_steps_get_their_own_sigmas(tiny_sd3):
    family = SD3Family.load(tiny_sd3)
    family.set_schedule(STEPS, A, 1.0)
    x, v = torch.randn(2, STEPS, 16, 8, 8).unbind(0)
    mixed = family.step_gaussian(v, x, family.timesteps)
    for i, t in enumerate(family.timesteps):
        one = family.step_gaussian(v[i : i + 1], x[i : i + 1], t.reshape(1))
        torch.testing.assert_close(mixed.mean[i : i + 1], one.mean)
        torch.testing.assert_close(mixed.std[i : i + 1], one.std)


def test_log_prob_is_differentiable_in_the_network(tiny_sd3):
    env = make_env(tiny_sd3, num_envs=2, num_steps=3, eta=A)
    policy = GaussianDenoisingPolicy.from_env(env, reduction="sum")
    obs, _ = env.reset(seed=0)
    action, _ = policy.act(obs, torch.Generator().manual_seed(0))
    policy.log_prob(obs, action).sum().backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_schedule_without_density_is_refused(tiny_sd3):
    family = SD3Family.load(tiny_sd3)
    with pytest.raises(ValueError, match="eta=0.0"):
        family.set_schedule(4, 0.0, 1.0)
    with pytest.raises(ValueError, match="CPS"):
        SD3CPSFamily.load(tiny_sd3).set_schedule(4, 1.5, 1.0)
    with pytest.raises(ValueError, match="eta=0.0") as exc:  # the env's own check speaks of both families
        make_env(tiny_sd3, num_envs=1, num_steps=3, eta=0.0)
    assert "noise level a" in str(exc.value) and "Flow-GRPO: 0.7" in str(exc.value)


def test_deterministic_sampling_is_diffusers_sd3_pipeline(tiny_sd3):
    """The ODE episode (guidance 4.5) ends where StableDiffusion3Pipeline's Euler sampler does. The pipeline
    always appends T5 positions (zeros without T5), so the family is built with them (``t5_tokens``)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    fam = SD3Family(pipe.scheduler, pipe.vae, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2],
                    joint_attention_dim=pipe.transformer.config.joint_attention_dim, t5_tokens=8)  # fmt: skip
    fam.set_schedule(STEPS, A, 4.5)
    forward = fam.plain_forward(pipe.transformer)
    x_T = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    x = x_T.clone()
    for t in fam.timesteps:
        x, _ = fam.sample(forward, {"prompt": ("a cat", "a dog"), "t": t.expand(2), "x_t": x}, 4.5, deterministic=True)
    want = pipe(["a cat", "a dog"], num_inference_steps=STEPS, guidance_scale=4.5, latents=x_T.clone(),
                output_type="latent", max_sequence_length=8).images  # fmt: skip
    assert not torch.allclose(x_T, want, atol=1e-2)
    torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-4)


def test_conditioning_is_the_sd3_pipelines(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    fam = SD3Family(pipe.scheduler, pipe.vae, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2],
                    joint_attention_dim=pipe.transformer.config.joint_attention_dim, t5_tokens=8)  # fmt: skip
    embeds, _, pooled, _ = pipe.encode_prompt("a red circle", None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=8)  # fmt: skip
    cond = fam.condition(["a red circle"])
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["pooled_projections"], pooled)
    loaded = load_family(str(tiny_sd3))  # model_index names no T5: no T5 tokens at all
    assert loaded.condition(["a red circle"])["encoder_hidden_states"].shape[1] == pipe.tokenizer.model_max_length


def test_regression_target_is_rectified_flows(tiny_sd3):
    family = SD3Family.load(tiny_sd3)
    family.set_schedule(STEPS, A, 1.0)
    t, noise = family.training_inputs(4, (16, 8, 8), torch.Generator().manual_seed(0))
    assert t.min() >= 1 and t.max() <= 1000
    x0 = torch.randn(4, 16, 8, 8)
    x_t, target = family.noised(x0, t, noise)
    sigma = (t.double() / 1000).view(-1, 1, 1, 1)
    on_schedule = torch.isin(t, family.timesteps)
    want = ((1 - sigma) * x0 + sigma * noise)[~on_schedule]
    torch.testing.assert_close(x_t[~on_schedule].double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target, noise - x0)


def test_first_ppo_minibatch_log_ratio_is_zero(tiny_sd3):
    env = make_env(tiny_sd3, num_envs=4, num_steps=4, eta=A, guidance_scale=4.5)
    policy = GaussianDenoisingPolicy.from_env(env)
    ro = collect_rollout(env, policy, seed=0, generator=torch.Generator().manual_seed(0))
    sample_idx, step_idx = torch.tensor([3, 0, 2, 1, 1, 0]), torch.tensor([0, 3, 1, 2, 0, 1])
    batch = RolloutBuffer(ro, ro.rewards, 6).pairs(sample_idx, step_idx, ro.rewards[sample_idx], 6)
    with torch.no_grad():
        log_ratio = policy.log_prob(batch.obs, batch.actions) - batch.old_log_probs
    assert log_ratio.abs().max() < 1e-6


@pytest.mark.parametrize("algo", ["ddpo-is", "ddpo-sf", "rwr", "rwr-sparse"])
def test_every_algorithm_trains_the_flow_family_unchanged(tiny_sd3, tmp_path, algo):
    """No algorithm knows the family: each trains the SD3 toy (RWR on the flow regression target)."""
    from agents.config import TrainConfig
    from agents.trainer import Trainer

    cfg = TrainConfig(env_id="Denoise-SD14-Incompressibility-v0", algo=algo, num_epochs=1, samples_per_epoch=4,
                      sample_batch_size=4, train_batch_size=4, micro_batch_size=8, num_steps=3, eta=A,
                      guidance_scale=4.5, learning_rate=1e-3, samples_per_prompt=2 if algo.startswith("rwr") else 1,
                      env_kwargs=dict(model=str(tiny_sd3), family="sd3-flow", height=16, width=16,
                                      prompts=["a cat", "a dog"]),
                      run_dir=str(tmp_path / "run"), progress=False, per_prompt_min_count=2,
                      per_prompt_buffer_size=8)  # fmt: skip
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.policy.trainable_state().items()}
    metrics = trainer.train()
    after = trainer.policy.trainable_state()
    assert isinstance(trainer.policy.family, SD3Family)
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter moved"
    assert all(math.isfinite(v) for v in metrics[-1].values() if isinstance(v, float))


def test_cli_train_resume_eval_sample_on_a_tinyflow_id(tmp_path, capsys):
    """``denoise-gym train|eval|sample`` on a TinyFlow ID (random weights of the tiny flow model's
    architecture); an interrupted run resumed equals the uninterrupted one (LoRA)."""
    import json

    from agents.cli import main
    from diffusion_env.testing import build_random_model

    model = build_random_model(tmp_path / "tinyflow", size="tinyflow")

    def argv(run, epochs):
        return ["train", "--env", "Denoise-TinyFlow-Compressibility-v0", "--algo", "ddpo-is", "--preset", "tiny",
                "--num-epochs", str(epochs), "--samples-per-epoch", "4", "--sample-batch-size", "4",
                "--train-batch-size", "2", "--num-steps", "3", "--lora-rank", "2", "--num-eval-prompts", "1",
                "--progress", "false", "--env-kwargs", json.dumps({"model": str(model)}), "--run-dir", str(run)]  # fmt: skip

    assert main(argv(tmp_path / "full", 2)) == 0
    assert main(argv(tmp_path / "part", 1)) == 0
    assert main(["train", "--resume", str(tmp_path / "part"), "--num-epochs", "2", "--progress", "false"]) == 0
    rows = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in ("full", "part")}
    for a, b in zip(rows["full"], rows["part"], strict=True):
        assert a["charts/reward_mean"] == b["charts/reward_mean"] and a["losses/approx_kl"] == b["losses/approx_kl"]
    from safetensors.torch import load_file

    w = {k: load_file(str(tmp_path / k / "checkpoints" / "ckpt-0002" / "weights.safetensors")) for k in ("full", "part")}
    assert w["full"].keys() == w["part"].keys() and all("lora" in k for k in w["full"])
    assert all(torch.equal(w["full"][k], w["part"][k]) for k in w["full"])
    assert main(["eval", "--run", str(tmp_path / "full"), "--num-samples", "2"]) == 0
    assert main(["sample", "--run", str(tmp_path / "full"), "--prompt", "a red circle", "--out",
                 str(tmp_path / "grid.png")]) == 0  # fmt: skip
    assert (tmp_path / "grid.png").is_file()
