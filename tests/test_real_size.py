"""Real-size architectures (diffusion_env.real_configs) and their benchmarks, without building real-size weights:
parameters are counted on the meta device, runs use the debug scale."""

from __future__ import annotations

import json
import types

import pytest
import torch

from diffusion_env import real_configs as rc


def test_sd35_medium_parameters_add_up_to_the_published_total():
    counts = rc.parameter_counts("sd35-medium")
    # keras-hub's SD3.5-Medium preset (keras_hub/src/models/stable_diffusion_3/stable_diffusion_3_presets.py):
    # 3,371,793,763 weights for CLIP-L + CLIP-G + MMDiT-X + VAE, its 384² position table included.
    assert sum(counts.values()) == 3_371_793_763
    # The model card's "2.5B" MMDiT-X: the transformer without its fixed position table.
    assert 2.2e9 < counts["transformer"] < 2.5e9
    assert counts["pos_embed"] == 384 * 384 * 24 * 64  # pos_embed_max_size² x hidden size


def test_sd14_parameters_match_the_published_counts():
    counts = rc.parameter_counts("sd14")
    # diffusers' ModelMixin.num_parameters example (the SD v1 UNet); fast.ai forum "Stable diffusion parameter
    # budget allocation": CLIP text encoder and VAE.
    assert counts == {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}


def test_headline_figures_of_the_configs():
    sd35 = rc.architecture("sd35-medium")
    t = sd35["transformer"]
    assert (t["num_layers"], t["attention_head_dim"], t["num_attention_heads"]) == (24, 64, 24)
    assert (t["caption_projection_dim"], t["joint_attention_dim"], t["pooled_projection_dim"]) == (1536, 4096, 2048)
    assert t["dual_attention_layers"] == list(range(13)) and t["qk_norm"] == "rms_norm"
    # The two CLIPs' penultimate states fit the joint attention width; their projections make the pooled vector.
    enc1, enc2 = sd35["text_encoder"], sd35["text_encoder_2"]
    assert enc1["hidden_size"] + enc2["hidden_size"] <= t["joint_attention_dim"]
    assert enc1["projection_dim"] + enc2["projection_dim"] == t["pooled_projection_dim"]
    vae = sd35["vae"]
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 1.5305, 0.0609)
    assert not vae["use_quant_conv"] and not vae["use_post_quant_conv"]
    assert sd35["scheduler"]["shift"] == 3.0
    sd14 = rc.architecture("sd14")
    assert sd14["unet"]["cross_attention_dim"] == sd14["text_encoder"]["hidden_size"] == 768
    assert sd14["vae"]["scaling_factor"] == 0.18215


def test_architecture_refuses_unknown_names_and_returns_copies():
    with pytest.raises(ValueError, match="expected one of"):
        rc.architecture("sdxl")
    with pytest.raises(ValueError, match="expected one of"):
        rc.architecture("sd14", scale="huge")
    rc.architecture("sd14")["unet"]["layers_per_block"] = 99
    assert rc.architecture("sd14")["unet"]["layers_per_block"] == 2


@pytest.mark.parametrize("arch", rc.ARCHS)
def test_debug_scale_keeps_the_layout(arch):
    real, debug = rc.architecture(arch), rc.architecture(arch, "debug")
    # Same latent shape, VAE factor, vocabulary and token count: only widths and depths shrink.
    assert debug["vae"]["latent_channels"] == real["vae"]["latent_channels"]
    assert len(debug["vae"]["block_out_channels"]) == len(real["vae"]["block_out_channels"])
    assert debug["text_encoder"]["vocab_size"] == 49408 and debug["text_encoder"]["max_position_embeddings"] == 77
    assert sum(rc.parameter_counts(arch, "debug").values()) < sum(rc.parameter_counts(arch).values()) / 100


@pytest.mark.parametrize("arch", rc.ARCHS)
def test_debug_model_round_trips_through_the_real_layout(arch, tmp_path):
    from diffusion_env.models import load_family

    family, network = rc.build_parts(arch, scale="debug", seed=3)
    folder = rc.build_real_size_model(tmp_path / arch, arch, seed=3, scale="debug")
    loaded = load_family(folder)
    assert type(loaded) is type(family)
    state, again = network.state_dict(), loaded.load_network().state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    # Real token count (77 CLIP positions, plus 256 zero T5 positions for SD3.5 in memory).
    cond = family.condition(["a photo of a cat"])["encoder_hidden_states"]
    assert cond.shape[1] == (77 + 256 if arch == "sd35-medium" else 77)
    debug = rc.architecture(arch, "debug")
    width = debug["transformer"]["joint_attention_dim"] if arch == "sd35-medium" else debug["text_encoder"]["hidden_size"]
    assert cond.shape[2] == width
    # Loaded from the folder it conditions alike: the index names T5 (as published), its folders are absent.
    torch.testing.assert_close(loaded.condition(["a photo of a cat"])["encoder_hidden_states"], cond)


def test_policy_gradient_checkpointing_is_switched_on_and_refused_where_missing():
    from agents.policy import GaussianDenoisingPolicy

    family, network = rc.build_parts("sd14", scale="debug")
    policy = GaussianDenoisingPolicy(network, family, lora_rank=2, gradient_checkpointing=True)
    assert policy.network.is_gradient_checkpointing
    with pytest.raises(ValueError, match="enable_gradient_checkpointing"):
        GaussianDenoisingPolicy(torch.nn.Linear(2, 2), family, gradient_checkpointing=True)


def test_train_config_documents_gradient_checkpointing():
    from agents.config import TrainConfig, field_help

    cfg = TrainConfig(gradient_checkpointing=True)
    assert cfg.policy_kwargs()["gradient_checkpointing"] is True
    assert "checkpoint" in field_help("gradient_checkpointing")


def test_real_size_debug_epoch_reports_consistent_figures(tmp_path):
    from benchmarks import real_size

    out = tmp_path / "r.json"
    result = real_size.main(["--arch", "sd35-medium", "--scale", "debug", "--size", "64", "--threads", "1",
                             "--json", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["settings"]["latent_shape"] == [16, 8, 8]
    assert saved["sample_calls"] == 2 and saved["train_calls"] == 2  # 2 steps; 4 pairs in micro-batches of 2
    f = saved["flops"]
    assert f["sample_call_rows"] == 4 and f["train_call_rows"] == 4  # guidance doubles the rows
    # A LoRA training call costs more than a forward (backward through the frozen network) but less than 3x.
    assert f["sample_call_flops"] < f["train_call_flops"] < 3 * f["sample_call_flops"]
    p = saved["projection"]["measured_steps"]
    per_sample = 2 * (f["sample_call_flops"] + f["train_call_flops"]) / 2 + f["decode_flops_per_image"]
    assert p["tflop_per_sample"] == pytest.approx(per_sample / 1e12)
    assert p["h100_samples_per_s"] == pytest.approx(0.4 * 989e12 / per_sample)
    assert saved["parameters"]["trainable"] > 0 and saved["peak_rss_mb"] > 0
    assert result["epoch_s"] >= result["sample_s"] > 0 and result["sample_call_s"] > 0 and result["train_call_s"] > 0
    assert result["ratio_dev_first"] < 1e-4  # fp32: the first training log-probs equal the sampled ones


def test_real_size_full_fine_tuning_and_checkpointing_cost_what_they_should():
    from benchmarks import real_size

    args = ["--arch", "sd14", "--scale", "debug", "--size", "64", "--threads", "1"]
    lora = real_size.main(args)["flops"]
    full_run = real_size.main(args + ["--full"])
    full, ckpt = full_run["flops"], real_size.main(args + ["--full", "--grad-checkpointing"])["flops"]
    assert full_run["parameters"]["trainable"] == full_run["parameters"]["unet"]
    forward = full["sample_call_flops"]  # same rows as a training call
    assert ckpt["sample_call_flops"] == forward  # checkpointing changes nothing without gradients
    # Full fine-tuning: forward + input and weight gradients (about 3 forwards); LoRA skips the weight gradients.
    assert 2.5 * forward < full["train_call_flops"] <= 3.0 * forward
    assert lora["train_call_flops"] < 0.8 * full["train_call_flops"]
    # Checkpointing recomputes the checkpointed parts' forward once more (in diffusers' UNet about three
    # quarters of it; SD3's transformer blocks nearly all).
    assert 0.5 * forward < ckpt["train_call_flops"] - full["train_call_flops"] <= forward


def test_gpu_check_refuses_in_one_line_without_cuda(monkeypatch, capsys):
    from benchmarks import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        gpu_check.main([])
    message = str(exc.value.code)
    assert "no CUDA device" in message and "\n" not in message


def test_gpu_check_row_on_the_debug_scale():
    from benchmarks import gpu_check

    args = types.SimpleNamespace(size=64, samples=2, steps=2, micro_batch=2, device="cpu", scale="debug")
    row = gpu_check.check("sd14", "bf16", args)
    assert row["autocast"] == "bf16" and row["samples_per_s"] > 0 and row["train_call_tflops"] > 0
    assert row["first_abs_log_ratio"] >= 0 and row["peak_gpu_mem_gb"] > 0
