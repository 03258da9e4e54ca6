"""What a user meets: generated help, one-line refusals, set-up messages that name every missing download
with a command that exists, labelled grids with their prompts, honest stop reasons, clean Ctrl-C and
resume, failed starts that leave nothing behind, benchmarks that leave committed results alone, prompt
truncation warnings, and the README's first Python block."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agents.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _train_parser():
    from agents.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["train"]


def _cfg(tiny_sd, run_dir, **kw):
    base = dict(env_id="Denoise-SD14-Incompressibility-v0", algo="ddpo-is", num_epochs=2, samples_per_epoch=4,
                sample_batch_size=2, train_batch_size=2, micro_batch_size=16, num_steps=2, learning_rate=1e-3,
                env_kwargs=dict(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog"]),
                run_dir=str(run_dir), progress=False, per_prompt_min_count=2, per_prompt_buffer_size=8,
                num_eval_prompts=2)  # fmt: skip
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- help
def _shown_default(value) -> str:
    """How the help should show a default, written out independently of agents.cliargs."""
    if value is None:
        return "none"
    if value is True:
        return "on"
    if value is False:
        return "off"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def test_every_train_option_has_help_text_and_shows_its_default():
    p = _train_parser()
    by_dest = {a.dest: a for a in p._actions}
    text = p.format_help()
    defaults = TrainConfig()
    fields = [(f, getattr(defaults, f.name)) for f in dataclasses.fields(TrainConfig) if f.name != "algo_config"]
    fields += [(f, getattr(defaults.algo_config, f.name)) for f in dataclasses.fields(defaults.algo_config)]
    for f, default in fields:  # the shared fields and those of the default algorithm's config
        action = by_dest.get(f.name)
        assert action is not None, f"no option for TrainConfig.{f.name}"
        assert action.help and len(action.help) > 20, f"--{f.name}: no help text"
        assert f"(default: {_shown_default(default)})" in action.help, action.help
        assert action.option_strings[0] in text
    # options that are not TrainConfig fields are documented too
    for a in p._actions:
        if a.option_strings and a.dest != "help":
            assert a.help and "default" in a.help, a.option_strings


def test_a_field_without_documentation_cannot_become_an_option():
    import argparse

    from agents.cliargs import add_dataclass_options

    @dataclasses.dataclass
    class Undocumented:
        x: int = 1

    with pytest.raises(ValueError, match="Undocumented.x has no metadata"):
        add_dataclass_options(argparse.ArgumentParser(), Undocumented)


def test_algo_help_lists_every_registered_algorithm_with_a_line_each():
    from agents import registry

    def my_update(policy, optimizer, rollout, advantages, cfg, generator, tracker):
        """My-algo: a test algorithm that says what it is."""
        return {}

    registry.register_algo("my-algo", my_update, override=True)
    try:
        p = _train_parser()
        text = p.format_help()
        for name in registry.registered_algos():
            assert re.search(rf"^\s+{re.escape(name)}\s+\S", text, re.M), f"{name} is not listed with a description"
        assert "My-algo: a test algorithm that says what it is." in text
        algo = next(a for a in p._actions if a.dest == "algo")
        assert set(algo.choices) == set(registry.registered_algos())
        assert "Denoise-Tiny-Compressibility-v0" in text and "Denoise-SD14-Aesthetic-v0" in text
    finally:
        registry._ALGOS.pop("my-algo", None)


def test_boolean_options_are_flags_and_bad_values_are_refused_in_one_line(capsys):
    p = _train_parser()
    assert p.parse_args(["--progress"]).progress is True
    assert p.parse_args(["--no-progress"]).progress is False
    assert p.parse_args(["--progress", "false"]).progress is False  # the older spelling still works
    assert not hasattr(p.parse_args([]), "progress")  # not given: the config's (or preset's) value stays
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--progress", "maybe"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "--progress 'maybe'" in err and "--no-progress" in err
    with pytest.raises(SystemExit):
        p.parse_args(["--algo", "nope"])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "ddpo-is" in err, err


def test_optional_fields_accept_none_and_presets_keep_values_not_given():
    from agents.cli import CONFIG_FIELDS
    from agents.cliargs import given_options

    p = _train_parser()
    args = p.parse_args(["--preset", "sd14", "--lora-rank", "none", "--num-epochs", "3"])
    given = given_options(args, CONFIG_FIELDS)
    assert given == {"lora_rank": None, "num_epochs": 3}


# ---------------------------------------------------------------------------------------------- downloads
def _commands(message: str) -> list[str]:
    return re.findall(r"`([^`]+)`", message)


def test_missing_weights_of_sd14_aesthetic_are_named_in_one_message_with_runnable_commands(tmp_path, monkeypatch):
    import gymnasium as gym
    import huggingface_hub.constants as hf_constants

    import diffusion_env  # noqa: F401
    from diffusion_env.downloads import MissingDownloadsError

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("DENOISE_GYM_AESTHETIC_HEAD", raising=False)
    with pytest.raises(MissingDownloadsError) as exc:
        gym.make_vec("Denoise-SD14-Aesthetic-v0", num_envs=1)
    msg = str(exc.value)
    for repo in ("CompVis/stable-diffusion-v1-4", "openai/clip-vit-large-patch14", "camenduru/improved-aesthetic-predictor"):
        assert repo in msg, f"{repo} missing from: {msg}"
    commands = _commands(msg)
    assert len(commands) == 3, msg
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    for cmd in commands:
        exe = shlex.split(cmd)[0]
        assert shutil.which(exe, path=search_path), f"{exe!r} of `{cmd}` does not exist here"
        assert shlex.split(cmd)[1] == "download"
    assert "huggingface-cli" not in msg


def test_nothing_is_reported_missing_once_the_pieces_are_in_the_cache(tmp_path, monkeypatch, tiny_sd):
    import huggingface_hub.constants as hf_constants

    from diffusion_env.downloads import missing_for_id

    cache = tmp_path / "hub"
    for repo, files in (("openai/clip-vit-large-patch14", ["config.json"]),
                        ("camenduru/improved-aesthetic-predictor", ["sac+logos+ava1-l14-linearMSE.pth"])):  # fmt: skip
        d = cache / ("models--" + repo.replace("/", "--"))
        (d / "refs").mkdir(parents=True)
        (d / "refs" / "main").write_text("a" * 40)
        snap = d / "snapshots" / ("a" * 40)
        snap.mkdir(parents=True)
        for f in files:
            (snap / f).write_text("x")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("DENOISE_GYM_AESTHETIC_HEAD", raising=False)
    assert [p.repo_id for p in missing_for_id("Denoise-SD14-Aesthetic-v0")] == ["CompVis/stable-diffusion-v1-4"]
    assert missing_for_id("Denoise-SD14-Aesthetic-v0", model=str(tiny_sd)) == []
    pieces = missing_for_id("Denoise-SD14-PromptAlignment-v0", model=str(tiny_sd))
    assert [p.repo_id for p in pieces] == ["roberta-large"]
    assert missing_for_id("Denoise-SD14-PromptAlignment-v0", model=str(tiny_sd),
                          reward_kwargs={"bertscore_model": "minilm"}) == []  # fmt: skip


# ---------------------------------------------------------------------------------------------- pictures
def test_labelled_grid_writes_prompts_under_images_and_a_json_of_them(tmp_path):
    from agents.plots import labelled_grid, save_labelled_grid

    images = torch.zeros(3, 3, 8, 8)  # black images: any light pixel below them is a label's background
    prompts = ["a red circle", "a long prompt " * 6, ""]
    plain_h = 8 * 4
    grid = labelled_grid(images, prompts, scale=4, seed=7, title="t")
    assert grid.dtype == np.uint8 and grid.shape[1] >= 3 * 8 * 4
    below = grid[4 + plain_h + 2 :, 4 : 4 + 32]  # under the first image
    assert (below < 100).any(), "no text under the first image"
    png, js = save_labelled_grid(tmp_path / "g.png", images, prompts, seed=7)
    meta = json.loads(js.read_text())
    assert meta["prompts"] == prompts and meta["seed"] == 7 and png.exists()
    with pytest.raises(ValueError, match="expected one prompt per image"):
        labelled_grid(images, prompts[:2])


def test_training_grids_have_a_json_of_their_prompts_and_the_curve_has_units(tiny_sd, tmp_path):
    from agents.trainer import Trainer

    tr = Trainer(_cfg(tiny_sd, tmp_path / "run", num_epochs=1))
    tr.train()
    for name in ("grid_before", "grid_after"):
        meta = json.loads((tmp_path / "run" / f"{name}.json").read_text())
        assert meta["prompts"] == ["a cat", "a dog"] and isinstance(meta["seed"], int)
    from agents.plots import reward_label

    assert reward_label(tr.env.reward_fn) == "reward (JPEG kB at quality 95)"
    # TensorBoard: the grid image and the hyperparameters are in the run's event file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "samples/eval_grid" in acc.Tags()["images"]
    plugins = acc.PluginTagToContent("hparams")
    assert plugins, "no hparams summary"
    assert tr.stop_reason == "num_epochs"


# ---------------------------------------------------------------------------------------------- limits
def test_the_binding_limit_is_named():
    from agents.progress import epochs_within_time, planned_epochs

    cfg = TrainConfig(num_epochs=40, samples_per_epoch=64, sample_batch_size=64)
    assert planned_epochs(cfg) == (40, "num_epochs")
    assert planned_epochs(cfg.replace(reward_query_budget=1000)) == (16, "reward_query_budget")  # ceil(1000/64)
    assert planned_epochs(cfg.replace(reward_query_budget=64 * 50)) == (40, "num_epochs")
    # 240 s limit, 100 s gone, 14 s epochs: epochs start while elapsed + 14 <= 240 -> 10 more
    assert epochs_within_time(240, 100, 14) == 10
    assert epochs_within_time(240, 239, 14) == 0


def test_budget_stop_is_reported_and_resume_of_a_finished_run_says_how_to_extend(tiny_sd, tmp_path, capsys):
    from agents.cli import main
    from agents.trainer import Trainer

    run = tmp_path / "run"
    tr = Trainer(_cfg(tiny_sd, run, num_epochs=5, reward_query_budget=8))
    tr.train()
    assert tr.epoch == 2 and tr.stop_reason == "reward_query_budget"
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "is finished" in out and "reward-query budget" in out
    assert f"denoise-gym train --resume {run}" in out and "--reward-query-budget 16" in out
    assert json.loads((run / "checkpoints" / "ckpt-0002" / "state.json").read_text())["epoch"] == 2  # untouched


def test_a_corrupt_latest_checkpoint_names_the_intact_previous_one(tiny_sd, tmp_path):
    from agents.trainer import Trainer

    run = tmp_path / "run"
    Trainer(_cfg(tiny_sd, run, num_epochs=2)).train()
    (run / "checkpoints" / "ckpt-0002" / "weights.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError) as exc:
        Trainer(_cfg(tiny_sd, run, num_epochs=2), resume=True)
    msg = str(exc.value)
    assert "ckpt-0002 is unreadable" in msg or "ckpt-0002" in msg.split("unreadable")[0]
    assert "ckpt-0001 (epoch 1) is intact" in msg and "--from-checkpoint ckpt-0001" in msg
    resumed = Trainer(_cfg(tiny_sd, run, num_epochs=2), resume=True, checkpoint="ckpt-0001")
    assert resumed.epoch == 1
    with pytest.raises(ValueError, match="no such folder"):
        Trainer(_cfg(tiny_sd, run, num_epochs=2), resume=True, checkpoint="ckpt-0009")


def test_failed_starts_leave_no_run_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from agents.cli import main

    out = tmp_path / "runs"
    assert main(["train", "--env", "Denoise-Nope-v0", "--output-dir", str(out), "--no-progress"]) == 2
    assert not out.exists()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["train", "--env", "Denoise-SD14-Compressibility-v0", "--output-dir", str(out), "--no-progress"]) == 3
    assert not out.exists()  # missing weights: exit code 3 (agents/errors.py), nothing left behind


def test_first_ctrl_c_asks_to_stop_and_the_second_stops_at_once():
    from agents.progress import GracefulInterrupt

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job started in the background with &
    with GracefulInterrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before  # the handler it replaced is back


def test_graceful_interrupt_without_a_message_is_quiet(capsys):
    """The other processes of a data-parallel run stop as the main one does, without saying it again."""
    from agents.progress import GracefulInterrupt

    for message, said in ((None, ""), ("stopping", "stopping")):
        with GracefulInterrupt(message=message) as interrupt:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert interrupt.requested
        assert capsys.readouterr().err.strip() == said


# ---------------------------------------------------------------------------------------------- Ctrl-C
NUM_EPOCHS = 4


def _train_cmd(tiny_sd: Path, run_dir: Path) -> list[str]:
    env_kwargs = json.dumps(dict(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog"]))
    return [sys.executable, "-m", "agents.cli", "train", "--env", "Denoise-SD14-Incompressibility-v0",
            "--algo", "ddpo-is", "--num-epochs", str(NUM_EPOCHS), "--samples-per-epoch", "8",
            "--sample-batch-size", "4", "--train-batch-size", "4", "--micro-batch-size", "16", "--num-steps", "4",
            "--learning-rate", "1e-3", "--per-prompt-min-count", "2", "--per-prompt-buffer-size", "8",
            "--num-eval-prompts", "1", "--no-progress", "--seed", "3", "--env-kwargs", env_kwargs,
            "--run-dir", str(run_dir)]  # fmt: skip


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "charts/samples_per_s"} for r in rows]


@pytest.mark.timeout(480)
def test_ctrl_c_stops_cleanly_and_the_printed_command_resumes_to_the_uninterrupted_result(tiny_sd, tmp_path):
    stopped, reference = tmp_path / "stopped", tmp_path / "reference"
    log_ref = open(tmp_path / "reference.log", "w")
    ref = subprocess.Popen(_train_cmd(tiny_sd, reference), env=_env(), cwd=ROOT, stdout=log_ref, stderr=subprocess.STDOUT)
    run = subprocess.Popen(_train_cmd(tiny_sd, stopped), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        metrics = stopped / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # epoch 1 is done
            assert run.poll() is None, run.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no epoch within 300 s"
            time.sleep(0.02)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "Ctrl-C" in err
    m = re.search(r"Resume with:\n\s+(denoise-gym train --resume .+)", out)
    assert m, out
    name = (stopped / "checkpoints" / "latest").read_text()
    epoch = json.loads((stopped / "checkpoints" / name / "state.json").read_text())["epoch"]
    assert 1 <= epoch < NUM_EPOCHS, f"the run was not stopped early (epoch {epoch})"
    assert len(metrics.read_text().splitlines()) == epoch  # every finished epoch is recorded, nothing more

    cmd = shlex.split(m.group(1))
    assert cmd[:4] == ["denoise-gym", "train", "--resume", str(stopped)]
    resumed = subprocess.run([sys.executable, "-m", "agents.cli", *cmd[1:]], env=_env(), cwd=ROOT,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ref.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    log_ref.close()
    final = f"ckpt-{NUM_EPOCHS:04d}"
    a = load_file(str(stopped / "checkpoints" / final / "weights.safetensors"))
    b = load_file(str(reference / "checkpoints" / final / "weights.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert _strip(rows(stopped)) == _strip(rows(reference))


# ---------------------------------------------------------------------------------------------- benchmarks
def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    from diffusion_env.testing import build_random_model

    return build_random_model(tmp_path_factory.mktemp("micro") / "model", size="micro")


def test_leaderboard_quick_leaves_the_committed_results_untouched(micro_model, tmp_path):
    from benchmarks import leaderboard

    before = _tree_digest(leaderboard.RESULTS)
    assert before, "benchmarks/results should hold the committed figures"
    argv = ["--quick", "--model", str(micro_model), "--num-steps", "2", "--samples-per-epoch", "4", "--budget", "4",
            "--eval-samples", "2", "--tasks", "Compressibility", "--algos", "ddpo-is", "--runs", str(tmp_path / "runs")]  # fmt: skip
    leaderboard.main(argv)
    assert _tree_digest(leaderboard.RESULTS) == before
    assert (tmp_path / "runs" / "results" / "leaderboard.md").exists()
    assert leaderboard.parse_args(["--quick"]).out != leaderboard.RESULTS
    assert leaderboard.parse_args([]).out == leaderboard.RESULTS


# ---------------------------------------------------------------------------------------------- prompts
def test_a_prompt_longer_than_the_window_warns_once_with_its_token_count(tiny_sd):
    from diffusion_env.models import load_family
    from diffusion_env.prompts import PromptTruncationWarning

    family = load_family(tiny_sd)
    tok = family.tokenizer
    long = "a red circle above a blue square next to a green triangle under a yellow star " + str(time.time())
    count = len(tok(long, truncation=False, verbose=False).input_ids)
    assert count > tok.model_max_length
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        family.condition([long, long, "a cat", ""])
        load_family(tiny_sd).condition([long])  # another family: the prompt was warned about already
    hits = [w for w in caught if issubclass(w.category, PromptTruncationWarning)]
    assert len(hits) == 1, [str(w.message) for w in caught]
    assert f"has {count} tokens" in str(hits[0].message) and f"first {tok.model_max_length}" in str(hits[0].message)


# ---------------------------------------------------------------------------------------------- README
def test_the_readmes_first_python_block_runs_as_written():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    env = {k: v for k, v in _env().items() if not k.startswith("DENOISE_GYM")}
    r = subprocess.run([sys.executable, "-c", block], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_benchmark_figures_that_could_surprise_are_explained():
    from benchmarks.async_rewards import explain_hidden_fraction
    from benchmarks.improvement import QUICK, RUNS, estimate_line

    neg = explain_hidden_fraction(-0.3, threads=2)
    assert "did not pay" in neg and "2 CPU thread" in neg
    assert "fully hidden" in explain_hidden_fraction(1.2, threads=2)
    assert "50%" in explain_hidden_fraction(0.5, threads=2)
    # 3 runs x ceil(2048 / 64) = 32 epochs x 15 s = 24 min on the tiny DDIM model
    assert estimate_line([("Denoise-Tiny-Compressibility-v0", 64)] * 3, 2048).startswith(
        "3 run(s) x 32 epochs of 64 samples at ~15 s: about 24 min")
    # the tiny flow model's epochs take ~62 s per 64 samples: 32 epochs of 32 samples x 31 s + 16 x 15 s = 20.5 min
    line = estimate_line([("Denoise-TinyFlow-Compressibility-v0", 32), ("Denoise-Tiny-Compressibility-v0", 64)], 1024)
    assert "32 epochs of 32 samples at ~31 s" in line and "16 epochs of 64 samples at ~15 s" in line
    assert "about 21 min" in line
    assert QUICK["runs"] != RUNS and QUICK["budget"] < 2048


def test_throughput_heartbeat_prints_while_a_silent_phase_runs():
    import io

    from benchmarks.heartbeat import heartbeat

    out = io.StringIO()
    with heartbeat("compiling", every_s=0.05, out=out):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all("compiling" in line and "s so far" in line for line in lines)


def test_a_preset_with_an_explicit_algorithm_builds_its_config():
    from agents.cli import new_train_config

    cfg = new_train_config({"algo": "rwr", "env_id": "Denoise-Tiny-PromptAlignment-v0", "num_epochs": 3}, "tiny")
    assert (cfg.algo, cfg.num_epochs, cfg.samples_per_prompt) == ("rwr", 3, 8)  # the tiny RWR preset's groups
    assert new_train_config({"algo": "ddpo-sf"}).algo == "ddpo-sf"


@pytest.mark.parametrize("keep, expected", [(2, ["ckpt-0002", "ckpt-0003"]), (3, ["ckpt-0001", "ckpt-0002", "ckpt-0003"]),
                                            (0, ["ckpt-0001", "ckpt-0002", "ckpt-0003"])])  # fmt: skip
def test_keep_checkpoints_keeps_the_newest_or_every_one(tiny_sd, tmp_path, keep, expected):
    from agents.trainer import Trainer

    run = tmp_path / "run"
    Trainer(_cfg(tiny_sd, run, num_epochs=3, keep_checkpoints=keep)).train()
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*")) == expected
    assert (run / "checkpoints" / "latest").read_text() == "ckpt-0003"


def test_keep_checkpoints_of_one_is_refused(tiny_sd, tmp_path):
    with pytest.raises(ValueError, match=r"keep_checkpoints=1: expected 0 \(keep all\) or >= 2"):
        _cfg(tiny_sd, tmp_path / "run", keep_checkpoints=1).validate()
