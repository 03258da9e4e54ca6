"""GRPO and the algorithm API: group advantages, the KL to the reference policy, algorithm state through resume,
per-algorithm configs on the command line and in old config.json files, CFG-free and windowed training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agents.config import TrainConfig, parse_train_timesteps, preset_config
from agents.core import Rollout, RolloutBuffer, gaussian_kl, group_advantages
from agents.trainer import Trainer


def _base(tiny_sd, run_dir, **kw) -> dict:
    base = dict(env_id="Denoise-SD14-Incompressibility-v0", algo="grpo", num_epochs=2, samples_per_epoch=4,
                sample_batch_size=4, samples_per_prompt=2, train_batch_size=4, micro_batch_size=16, num_steps=2,
                learning_rate=1e-2, env_kwargs=dict(model=str(tiny_sd), height=16, width=16,
                                                    prompts=["a cat", "a dog", "a red circle"]),
                run_dir=str(run_dir), progress=False, per_prompt_min_count=2, per_prompt_buffer_size=8,
                num_eval_prompts=1)  # fmt: skip
    return {**base, **kw}


def _cfg(tiny_sd, run_dir, **kw) -> TrainConfig:
    """A tiny GRPO run: one optimizer step per epoch, β 0.5, clip 0.2 (so that few pairs are clipped)."""
    return TrainConfig(**_base(tiny_sd, run_dir, **{"beta": 0.5, "clip_range": 0.2, **kw}))


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "charts/samples_per_s"} for r in rows]


# ------------------------------------------------------------------------------------------ advantages
def test_group_advantages_are_zero_mean_unit_std_within_every_group():
    rng = np.random.default_rng(0)
    prompts = [f"p{i}" for i in range(5) for _ in range(6)] + ["flat"] * 4
    rewards = np.concatenate([rng.normal(10 * i, 1 + i, size=6) for i in range(5)] + [np.full(4, 3.0)])
    order = rng.permutation(len(prompts))  # groups interleaved, as prompts drawn in any order
    prompts, rewards = [prompts[i] for i in order], rewards[order]
    adv = group_advantages(prompts, torch.tensor(rewards, dtype=torch.float32)).numpy()
    for p in set(prompts):
        a = adv[[i for i, q in enumerate(prompts) if q == p]]
        if p == "flat":
            assert np.all(a == 0.0)  # equal rewards: no preference
            continue
        assert abs(a.mean()) < 1e-5, p
        assert abs(a.std() - 1.0) < 1e-3, p  # population std, up to the ε in the denominator
    # not normalised over the batch: the group means (0, 10, 20, …) are gone
    assert abs(adv.mean()) < 1e-5 and adv.max() < 3


# ------------------------------------------------------------------------------------------ KL
def test_gaussian_kl_is_the_closed_form_and_its_gradient_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    ref_mean = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    std = torch.tensor([0.3, 0.7, 1.5], dtype=torch.float64).view(3, 1, 1, 1)
    theta = torch.tensor([0.8, -0.4], dtype=torch.float64, requires_grad=True)

    def kl(th, reduction):
        mean = th[0] * x + th[1] * x**2  # a toy "network"
        return gaussian_kl(mean, ref_mean, std, reduction).sum()

    mean = (theta[0] * x + theta[1] * x**2).detach()
    closed = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std.expand_as(mean)),
                                               torch.distributions.Normal(ref_mean, std.expand_as(mean)))  # fmt: skip
    assert torch.allclose(gaussian_kl(mean, ref_mean, std, "sum"), closed.sum(dim=(1, 2, 3)))
    assert torch.allclose(gaussian_kl(mean, ref_mean, std, "mean"), closed.mean(dim=(1, 2, 3)))
    assert float(gaussian_kl(ref_mean, ref_mean, std, "mean").abs().max()) == 0.0  # π = π_ref: no penalty
    for reduction in ("mean", "sum"):
        (grad,) = torch.autograd.grad(kl(theta, reduction), theta)
        h = 1e-6
        for i in range(2):
            e = torch.zeros(2, dtype=torch.float64)
            e[i] = h
            fd = (kl(theta.detach() + e, reduction) - kl(theta.detach() - e, reduction)) / (2 * h)
            assert abs(float(grad[i]) - float(fd)) < 1e-6 * max(1.0, abs(float(fd))), (reduction, i)


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_kl_to_the_reference_is_zero_at_the_first_step_then_positive(tiny_sd, tmp_path, lora_rank):
    """One optimizer step per epoch: epoch 1's KL is computed at the base weights (0 exactly); epoch 2's is not.
    The reference keeps the base weights (a frozen copy, or the network with its adapters switched off)."""
    tr = Trainer(_cfg(tiny_sd, tmp_path / "run", lora_rank=lora_rank))
    assert tr.reference is not None and (tr.reference.network is None) == (lora_rank is not None)
    trainable = [n for n, p in tr.policy.network.named_parameters() if p.requires_grad]
    hist = tr.train()
    assert hist[0]["losses/kl_ref"] == 0.0
    assert hist[1]["losses/kl_ref"] > 0.0
    assert [n for n, p in tr.policy.network.named_parameters() if p.requires_grad] == trainable  # adapters back on
    base = tr.env.family.load_network()
    if lora_rank is None:
        for (n, p), (_, q) in zip(tr.reference.network.named_parameters(), base.named_parameters()):
            assert torch.equal(p, q) and not p.requires_grad, n
    # the reference's step Gaussian is the base network's, the policy's is not any more
    obs = {"x_t": torch.randn(2, 4, 8, 8), "t": tr.env.family.timesteps[:2], "prompt": ("a cat", "a dog")}
    ref_mean = tr.reference.distribution(obs["x_t"], obs["t"], obs["prompt"]).mean
    fam = tr.env.family
    with torch.no_grad():
        base_mean = fam.step_distribution(fam.plain_forward(base), obs["x_t"], obs["t"], fam.condition(obs["prompt"]),
                                          tr.policy.guidance_scale).mean  # fmt: skip
        policy_mean = tr.policy.distribution(obs["x_t"], obs["t"], obs["prompt"]).mean
    assert torch.allclose(ref_mean, base_mean, atol=1e-6)
    assert not torch.allclose(policy_mean, base_mean, atol=1e-6)
    tr.close()


def test_grpo_trains_the_flow_family_with_its_kl(tiny_sd3, tmp_path):
    """The SD3-layout toy (flow SDE, guidance 4.5): the same KL behaviour, LoRA on the MMDiT's projections."""
    env_kwargs = dict(model=str(tiny_sd3), height=16, width=16, prompts=["a cat", "a dog", "a red circle"])
    tr = Trainer(_cfg(tiny_sd3, tmp_path / "run", lora_rank=2, eta=0.7, guidance_scale=4.5, env_kwargs=env_kwargs))
    assert tr.env.family.name == "sd3-flow"
    hist = tr.train()
    assert hist[0]["losses/kl_ref"] == 0.0 and hist[1]["losses/kl_ref"] > 0.0
    assert all(np.isfinite(h["losses/policy_loss"]) and h["losses/optimizer_steps"] == 1 for h in hist)
    tr.close()


def test_beta_zero_needs_no_reference(tiny_sd, tmp_path):
    tr = Trainer(_cfg(tiny_sd, tmp_path / "run", beta=0.0, num_epochs=1))
    assert tr.reference is None
    assert tr.train()[0]["losses/kl_ref"] == 0.0
    tr.close()


def test_offloaded_reference_stays_on_the_cpu_between_calls(tiny_sd):
    from agents.policy import GaussianDenoisingPolicy, ReferencePolicy
    from tests.conftest import make_env

    env = make_env(tiny_sd, num_envs=2)
    policy = GaussianDenoisingPolicy.from_env(env)
    ref = ReferencePolicy(policy, "offload")
    obs = {"x_t": torch.randn(2, 4, 8, 8), "t": env.family.timesteps[:2], "prompt": ("a cat", "a dog")}
    gauss = policy.distribution(obs["x_t"], obs["t"], obs["prompt"])
    assert float(ref.kl(obs, gauss).detach().abs().max()) == 0.0
    assert all(p.device.type == "cpu" for p in ref.network.parameters())
    env.close()


# ------------------------------------------------------------------------------------------ state and resume
def test_resuming_grpo_with_beta_reproduces_the_uninterrupted_run_bit_for_bit(tiny_sd, tmp_path):
    """β > 0 with an adaptive β (kl_target): the algorithm's state (the running β) goes through the checkpoint."""
    kw = dict(lora_rank=2, kl_target=1e-9, beta=0.3)
    full = Trainer(_cfg(tiny_sd, tmp_path / "a", num_epochs=3, **kw))
    full_hist = full.train()
    assert full.algo_state["beta"] != 0.3  # the state moved
    part = Trainer(_cfg(tiny_sd, tmp_path / "b", num_epochs=2, **kw))
    part.train()
    part.close()
    state = json.loads((tmp_path / "b" / "checkpoints" / "ckpt-0002" / "state.json").read_text())
    assert state["algo_state"]["beta"] == part.algo_state["beta"]
    resumed = Trainer(_cfg(tiny_sd, tmp_path / "b", num_epochs=3, **kw), resume=True)
    assert resumed.epoch == 2 and resumed.algo_state == part.algo_state
    resumed.train()
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert _strip(rows) == _strip(full_hist)
    assert resumed.algo_state == full.algo_state
    for (n, p), (_, q) in zip(full.policy.network.named_parameters(), resumed.policy.network.named_parameters()):
        assert torch.equal(p, q), n
    full.close()
    resumed.close()


def test_tensor_state_goes_through_safetensors_exactly(tiny_sd, tmp_path):
    from agents import registry

    def counting(policy, optimizer, rollout, advantages, cfg, generator, tracker=None, *, state):
        """Test algorithm: keeps a tensor and a float in its state, trains nothing."""
        state["sum"] = state.get("sum", torch.zeros(3, dtype=torch.float64)) + torch.tensor([1 / 3, 1e-300, 7.0],
                                                                                             dtype=torch.float64)
        state["count"] = state.get("count", 0) + 1
        return {}

    registry.register_algo("test-stateful", counting, override=True)
    try:
        cfg = TrainConfig(**_base(tiny_sd, tmp_path / "run", algo="test-stateful", num_epochs=1))
        tr = Trainer(cfg)
        tr.train()
        tr.close()
        again = Trainer(cfg.replace(num_epochs=2), resume=True)
        assert again.algo_state["count"] == 1
        assert torch.equal(again.algo_state["sum"], torch.tensor([1 / 3, 1e-300, 7.0], dtype=torch.float64))
        again.close()
    finally:
        registry._ALGOS.pop("test-stateful", None)


# ------------------------------------------------------------------------------------------ configs
def test_algorithm_fields_live_in_algo_config_and_unknown_ones_are_refused_with_the_known_ones():
    cfg = TrainConfig(algo="grpo", beta=0.04, clip_range=1e-3)
    assert type(cfg.algo_config).__name__ == "GRPOConfig" and cfg.algo_config.beta == 0.04
    assert cfg.clip_range == 1e-3  # read flat
    with pytest.raises(ValueError, match=r"samples_per_prompt=1: GRPO compares"):
        cfg.validate()
    with pytest.raises(ValueError) as exc:
        TrainConfig(algo="grpo", samples_per_prompt=4, rwr_beta=0.5).validate()
    assert "'grpo' has no setting 'rwr_beta'" in str(exc.value)
    assert all(f"'{name}'" in str(exc.value) for name in ("beta", "clip_range", "num_inner_epochs", "kl_target"))
    with pytest.raises(ValueError, match="ddpo-sf' has no setting 'num_inner_epochs'"):
        TrainConfig(algo="ddpo-sf", num_inner_epochs=2).validate()
    for preset in ("tiny", "sd14", "sd35"):
        preset_config(preset, "grpo").validate()
    tiny = preset_config("tiny", "grpo")
    assert tiny.samples_per_epoch == 64 and tiny.samples_per_prompt == 8
    sd35 = preset_config("sd35", "grpo")
    assert (sd35.samples_per_prompt, sd35.beta, sd35.clip_range, sd35.learning_rate, sd35.lora_rank) == (
        24, 0.04, 1e-4, 3e-4, 32)  # fmt: skip


def test_config_json_round_trips_and_old_flat_files_load():
    cfg = TrainConfig(algo="rwr", rwr_beta=2.5, rwr_updates_per_epoch=3)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # written before the algorithm API: every algorithm's field flat, also those of other algorithms
    old = {"env_id": "Denoise-Tiny-Compressibility-v0", "algo": "ddpo-is", "seed": 3, "num_inner_epochs": 2,
           "clip_range": 0.001, "rwr_beta": 0.2, "rwr_weighting": "reward", "rwr_cfg_training": True,
           "rwr_sparse_quantile": 0.9, "rwr_updates_per_epoch": 8, "recompute_old_log_probs": True,
           "timestep_fraction": 0.5, "compile_unet": False}  # fmt: skip
    loaded = TrainConfig.from_dict(old).validate()
    assert (loaded.algo_config.clip_range, loaded.algo_config.num_inner_epochs) == (0.001, 2)
    assert loaded.algo_config.recompute_old_log_probs is True and loaded.timestep_fraction == 0.5
    rwr = TrainConfig.from_dict({**old, "algo": "rwr", "rwr_beta": 4.0, "rwr_weighting": "advantage"}).validate()
    assert (rwr.algo_config.rwr_beta, rwr.algo_config.rwr_weighting, rwr.algo_config.rwr_updates_per_epoch) == (
        4.0, "advantage", 8)  # fmt: skip
    sf = TrainConfig.from_dict({**old, "algo": "ddpo-sf", "num_inner_epochs": 1}).validate()
    assert sf.to_dict()["algo_config"] == {}


# ------------------------------------------------------------------------------------------ command line
def test_help_of_grpo_lists_its_fields_with_their_help(capsys):
    from agents.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--algo", "grpo", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "options of grpo" in out
    for option, text in (("--beta FLOAT", "KL coefficient β"), ("--kl-target FLOAT", "Adaptive β"),
                         ("--clip-range FLOAT", "PPO clip range"), ("--adv-std-eps FLOAT", "group's reward std")):  # fmt: skip
        assert option in out and text in out, option
    assert "--rwr-beta" not in out


def test_an_option_of_another_algorithm_is_refused_in_one_line_listing_the_known_ones(capsys):
    from agents.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--algo", "grpo", "--rwr-beta", "0.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--rwr-beta" in err and "an option of rwr" in err
    assert all(f in err for f in ("--beta", "--clip-range", "--num-inner-epochs", "--kl-target"))


def test_builtin_algorithms_keep_their_flags():
    from agents.cli import CONFIG_FIELDS, build_parser, new_train_config
    from agents.cliargs import given_options

    parser = build_parser("ddpo-is")
    args = parser.parse_args(["train", "--algo", "ddpo-is", "--clip-range", "1e-3", "--num-inner-epochs", "2"])
    cfg = new_train_config(given_options(args, CONFIG_FIELDS + tuple(args.algo_fields)), "tiny")
    assert (cfg.algo_config.clip_range, cfg.algo_config.num_inner_epochs) == (1e-3, 2)
    args = build_parser("rwr").parse_args(["train", "--algo", "rwr", "--rwr-beta", "3", "--no-rwr-cfg-training"])
    cfg = new_train_config(given_options(args, CONFIG_FIELDS + tuple(args.algo_fields)))
    assert (cfg.algo_config.rwr_beta, cfg.algo_config.rwr_cfg_training) == (3.0, False)


def test_a_resumed_run_takes_its_own_algorithm_s_options(tmp_path):
    from agents.cli import algo_of_command_line, build_parser

    (tmp_path / "config.json").write_text(json.dumps(TrainConfig(algo="grpo", samples_per_prompt=2).to_dict()))
    assert algo_of_command_line(["train", "--resume", str(tmp_path), "--beta", "0.1"]) == "grpo"
    assert algo_of_command_line(["train", "--algo=rwr"]) == "rwr"
    assert algo_of_command_line(["train", "--resume", str(tmp_path / "none")]) == TrainConfig.algo
    args = build_parser("grpo").parse_args(["train", "--resume", str(tmp_path), "--beta", "0.1"])
    assert args.beta == 0.1 and "beta" in args.algo_fields


# ------------------------------------------------------------------------------------------ shared options
def test_train_timesteps_windows():
    assert parse_train_timesteps("all", 10) is None
    assert parse_train_timesteps("first:3", 10) == (0, 3)
    assert parse_train_timesteps("last:2", 10) == (8, 10)
    assert parse_train_timesteps("2:5", 10) == (2, 5)
    assert parse_train_timesteps("0:10", 10) is None
    for bad in ("first:0", "first:11", "5:5", "7:3", "some"):
        with pytest.raises(ValueError, match="train_timesteps"):
            parse_train_timesteps(bad, 10)
    with pytest.raises(ValueError, match="train_timesteps='half'"):
        TrainConfig(train_timesteps="half").validate()
    with pytest.raises(ValueError, match="RWR regresses final samples"):
        TrainConfig(algo="rwr", train_timesteps="first:2").validate()


def test_the_buffer_draws_pairs_from_the_window_only():
    B, S = 6, 8
    ro = Rollout(prompts=tuple("abcdef"), latents=torch.zeros(B, S + 1, 1, 1, 1), timesteps=torch.zeros(B, S),
                 log_probs=torch.zeros(B, S), rewards=torch.zeros(B), images=torch.zeros(B, 3, 1, 1),
                 train_window=(2, 6))  # fmt: skip
    buf = RolloutBuffer(ro, torch.zeros(B), micro_batch_size=7)
    steps = buf.train_steps(3, torch.Generator().manual_seed(0), timestep_fraction=0.5)
    pairs = [(int(s), int(j)) for st in steps for s, j in zip(st.sample_idx, st.step_idx)]
    assert len(pairs) == B * 2  # round(0.5 × 4) steps per sample
    assert {j for _, j in pairs} <= {2, 3, 4, 5}
    assert sorted(s for s, _ in pairs) == sorted(list(range(B)) * 2)


def test_windowed_cfg_free_run_trains_only_its_steps_and_counts_samples_as_queries(tiny_sd, tmp_path):
    from agents import registry

    seen = []

    def record(policy, optimizer, rollout, advantages, cfg, generator, tracker=None):
        """Test algorithm: records the pairs the buffer gives it."""
        buffer = RolloutBuffer(rollout, advantages, cfg.micro_batch_size)
        seen.append((rollout.num_steps, [int(j) for st in buffer.train_steps(2, generator) for j in st.step_idx]))
        return {}

    registry.register_algo("test-record", record, override=True)
    try:
        cfg = TrainConfig(env_id="Denoise-SD14-Incompressibility-v0", algo="test-record", num_epochs=2,
                          samples_per_epoch=4, sample_batch_size=2, train_batch_size=2, num_steps=4,
                          train_timesteps="first:1", cfg_free=True, run_dir=str(tmp_path / "run"), progress=False,
                          num_eval_prompts=1, env_kwargs=dict(model=str(tiny_sd), height=16, width=16,
                                                              prompts=["a cat", "a dog"]))  # fmt: skip
        tr = Trainer(cfg)
        assert tr.env.family.guidance_scale == 1.0 and tr.policy.guidance_scale == 1.0  # CFG-free
        hist = tr.train()
        assert [h["charts/reward_queries"] for h in hist] == [4, 8]  # samples, not trained steps
        assert all(S == 4 and steps == [0] * 4 for S, steps in seen)  # whole trajectories; step 0 trained only
        tr.close()
    finally:
        registry._ALGOS.pop("test-record", None)
    with pytest.raises(ValueError, match="cfg_free=True with guidance_scale=4.5"):
        TrainConfig(cfg_free=True, guidance_scale=4.5).validate()


# ------------------------------------------------------------------------------------------ the example
def test_grpo_example_is_short_and_trains(tiny_sd, tmp_path):
    import inspect

    from benchmarks.examples import grpo_kl

    source = inspect.getsource(grpo_kl)
    body = source.split("# --- the algorithm ---")[1].split("# --- end ---")[0]
    assert len([line for line in body.splitlines() if line.strip()]) <= 25
    tr = Trainer(_cfg(tiny_sd, tmp_path / "run", algo="grpo-example", num_epochs=1))
    assert tr.reference is not None
    (row,) = tr.train()
    assert np.isfinite(row["losses/grad_norm"]) and row["losses/grad_norm"] > 0
    tr.close()
