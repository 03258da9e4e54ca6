"""Expected CLI failures: one ``error:`` line saying what failed and what to do, a distinct exit code, no
traceback (``--debug`` adds it), and nothing the run wrote before is damaged."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents import errors
from agents.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _args(tiny_sd, run_dir, env="Denoise-SD14-Incompressibility-v0", epochs=1, **env_kwargs):
    kw = dict(model=str(tiny_sd), height=16, width=16, prompts=["a red circle", "a dog"], **env_kwargs)
    return ["train", "--env", env, "--algo", "ddpo-is", "--num-epochs", str(epochs), "--samples-per-epoch", "2",
            "--sample-batch-size", "2", "--train-batch-size", "2", "--micro-batch-size", "16", "--num-steps", "2",
            "--per-prompt-min-count", "2", "--per-prompt-buffer-size", "8", "--num-eval-prompts", "1",
            "--progress", "false", "--env-kwargs", json.dumps(kw), "--run-dir", str(run_dir)]  # fmt: skip


def _run(capsys, argv, code):
    """Run the CLI in this process; check the exit code and the single error line; return that line."""
    got = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert got == code, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def test_exit_codes_are_distinct():
    codes = list(errors.EXIT_CODES.values())
    assert len(set(codes)) == len(codes) and 0 not in codes and 1 not in codes


def test_missing_weights(capsys, tmp_path):
    argv = ["train", "--env", "Denoise-SD14-Compressibility-v0", "--algo", "ddpo-is", "--progress", "false",
            "--env-kwargs", json.dumps({"model": "nobody-here/no-such-model"}), "--run-dir", str(tmp_path / "r")]
    line = _run(capsys, argv, errors.EXIT_MISSING_MODEL)
    assert "missing model weights" in line and "nobody-here/no-such-model" in line and "download" in line


def test_no_checkpoint_is_said_before_loading_the_model(capsys, tmp_path, monkeypatch):
    from agents.config import TrainConfig
    from agents.trainer import config_json

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config_json(TrainConfig(env_id="Denoise-SD14-Compressibility-v0",
                                                             env_kwargs={"model": "nobody-here/x"})))  # fmt: skip
    line = _run(capsys, ["train", "--resume", str(run)], errors.EXIT_NO_CHECKPOINT)
    # the model does not exist: a "missing model" error would mean it was loaded first
    assert "no checkpoint to resume" in line and f"--run-dir {run}" in line and "start it afresh" in line


def test_run_directory_in_use(capsys, tmp_path):
    run = tmp_path / "run"
    code = "import sys, time\nfrom agents.rundir import lock_run_dir\nlock_run_dir(sys.argv[1])\nprint('ok', flush=True)\ntime.sleep(60)\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        line = _run(capsys, ["train", "--env", "Denoise-SD14-Compressibility-v0", "--algo", "ddpo-is",
                             "--run-dir", str(run)], errors.EXIT_LOCKED)  # fmt: skip
        assert f"pid {holder.pid}" in line and "wait for that run to finish" in line
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def _fail_second_checkpoint(monkeypatch, exc):
    import agents.trainer as trainer_mod

    real = trainer_mod.save_file
    calls = []

    def save_file(tensors, path):
        calls.append(path)
        if "ckpt-0002" in path:
            raise exc
        real(tensors, path)

    monkeypatch.setattr(trainer_mod, "save_file", save_file)


def _check_first_checkpoint_intact(run):
    from safetensors.torch import load_file

    assert (run / "checkpoints" / "latest").read_text() == "ckpt-0001"
    load_file(str(run / "checkpoints" / "ckpt-0001" / "weights.safetensors"))
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()][0] == 0


def test_permission_denied(capsys, tmp_path, monkeypatch, tiny_sd):
    # As root chmod cannot deny anything, so the OS error is raised where a read-only folder raises it.
    _fail_second_checkpoint(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "checkpoints/.ckpt-0002"))
    run = tmp_path / "run"
    line = _run(capsys, _args(tiny_sd, run, epochs=2), errors.EXIT_PERMISSION)
    assert "permission denied (checkpoints/.ckpt-0002)" in line and "make the folder writable" in line
    assert f"--resume {run}" in line
    _check_first_checkpoint_intact(run)


def test_disk_full_from_safetensors(capsys, tmp_path, monkeypatch, tiny_sd):
    from safetensors import SafetensorError

    _fail_second_checkpoint(monkeypatch, SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'))  # fmt: skip
    run = tmp_path / "run"
    line = _run(capsys, _args(tiny_sd, run, epochs=2), errors.EXIT_DISK_FULL)
    assert line.startswith("error: disk full") and "free some space" in line and f"--resume {run}" in line
    _check_first_checkpoint_intact(run)


def test_disk_full_oserror_is_recognised_through_the_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "x")
        except OSError as e:
            raise ValueError("could not write") from e
    except ValueError as e:
        assert errors.classify(e).code == errors.EXIT_DISK_FULL


def test_reward_server_unreachable(capsys, tmp_path, tiny_sd):
    run = tmp_path / "run"
    argv = _args(tiny_sd, run, env="Denoise-Tiny-PromptAlignment-v0",
                 reward_kwargs={"base_url": "http://127.0.0.1:9/v1", "max_retries": 0, "timeout": 5})
    line = _run(capsys, argv, errors.EXIT_REWARD_SERVER)
    assert "reward server unreachable" in line and "127.0.0.1:9" in line and "start the server" in line


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--num-epochs", "0"], "num_epochs=0: expected a positive integer"),
        ([], "reward 'jpeg_incompressibility' has no option 'qualty'; expected one of ['quality']"),
        ([], "quality=True; expected an integer in [1, 100]"),
        ([], "quality=95.9; expected an integer in [1, 100]"),
    ],
)
def test_bad_config_and_reward_options(capsys, tmp_path, tiny_sd, extra, match):
    if "qualty" in match:
        reward_kwargs = {"qualty": 90}
    elif "True" in match:
        reward_kwargs = {"quality": True}
    else:
        reward_kwargs = {"quality": 95.9} if "95.9" in match else {}
    argv = _args(tiny_sd, tmp_path / "run", reward_kwargs=reward_kwargs) + extra
    line = _run(capsys, argv, errors.EXIT_CONFIG)
    assert match in line


def test_debug_shows_the_traceback_and_keeps_the_code(capsys, tmp_path):
    argv = ["train", "--env", "Denoise-SD14-Compressibility-v0", "--algo", "ddpo-is", "--progress", "false",
            "--env-kwargs", json.dumps({"model": "nobody-here/no-such-model"}), "--run-dir", str(tmp_path / "r")]
    assert main([*argv, "--debug"]) == errors.EXIT_MISSING_MODEL
    err = capsys.readouterr().err
    # MissingDownloadsError: the ModelNotFoundError that lists every missing download at once
    assert "Traceback (most recent call last)" in err and ("ModelNotFoundError" in err or "MissingDownloadsError" in err)
    assert err.strip().splitlines()[-1].startswith("error: missing model weights")


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    import agents.cli as cli

    def boom(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_eval", boom)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), boom))
    with pytest.raises(ZeroDivisionError):
        main(["eval", "--run", "x"])


def _with_func(parser, fn):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.choices["eval"].set_defaults(func=fn)
    return parser


def test_a_real_process_prints_one_line_and_exits_with_the_code(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "agents.cli", "train", "--resume", str(tmp_path / "nothing")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == errors.EXIT_CONFIG
    assert proc.stderr.strip().splitlines() == [
        f"error: bad config or option: {tmp_path / 'nothing'} is not a run directory (no config.json); expected "
        "the folder of a run"
    ]


def test_a_misspelt_env_option_lists_the_known_ones(capsys, tmp_path, tiny_sd):
    line = _run(capsys, _args(tiny_sd, tmp_path / "run", num_stepz=3), errors.EXIT_CONFIG)
    assert "env 'Denoise-SD14-Incompressibility-v0' has no option 'num_stepz'; expected one of [" in line
    assert "'num_steps'" in line and "'reward_kwargs'" in line


def test_interrupt_is_one_line_with_its_own_code():
    failure = errors.classify(KeyboardInterrupt(), run_dir="runs/x")
    assert failure.code == errors.EXIT_INTERRUPTED and "--resume runs/x" in failure.message
