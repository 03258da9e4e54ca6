"""``denoise-gym``: train, evaluate and sample from the command line.

    denoise-gym train --env Denoise-Tiny-Compressibility-v0 --algo ddpo-is --preset tiny [--num-epochs 10 ...]
    denoise-gym train --resume runs/Denoise-Tiny-Compressibility-v0-ddpo-is-s0
    denoise-gym eval --run runs/Denoise-Tiny-Compressibility-v0-ddpo-is-s0
    denoise-gym sample --run RUN_DIR --prompt "a red circle" --prompt "a blue square" --out grid.png

Every :class:`~agents.config.TrainConfig` field is an option (``--field-name VALUE``), and so is every field
of the chosen algorithm's own config (``denoise-gym train --algo NAME --help`` lists them); an option of
another algorithm is refused with the list of the chosen one's.

Expected failures (missing weights, no checkpoint, a run directory in use, permission denied, a full
disk, an unreachable reward server, a bad option) print one line saying what failed and what to do,
and exit with a distinct code (:mod:`agents.errors`); ``--debug`` (anywhere on the line) adds the
traceback. Warnings print as one ``warning: ...`` line each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

from agents import errors
from agents.cliargs import HelpFormatter, OneLineParser, add_dataclass_options, format_default, given_options
from agents.config import PRESETS, TrainConfig, preset_config

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "algo_config")  # shared options


def _load_run_config(run: str) -> TrainConfig:
    path = Path(run) / "config.json"
    if not path.exists():
        raise ValueError(f"{run} is not a run directory (no config.json); expected the folder of a run")
    cfg = TrainConfig.from_dict(json.loads(path.read_text()))
    return cfg.replace(run_dir=str(run))


def format_options(overrides: dict[str, Any]) -> str:
    """Command-line options that set ``overrides`` (TrainConfig field values), as a shell would need them."""
    parts = []
    for name, value in overrides.items():
        flag = "--" + ("env" if name == "env_id" else name.replace("_", "-"))
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts += [flag, shlex.quote(format_default(value))]
    return " ".join(parts)


def resume_command(run_dir: Path, overrides: dict[str, Any] | None = None) -> str:
    """The exact command that continues ``run_dir`` (with the options given to this resumed run)."""
    extra = format_options({k: v for k, v in (overrides or {}).items() if k != "run_dir"})
    return f"denoise-gym train --resume {shlex.quote(str(run_dir))}" + (f" {extra}" if extra else "")


def print_outputs(run_dir: Path, *, file=None) -> None:
    """Where a run's outputs are (the files that exist)."""
    file = file or sys.stdout
    entries = [
        ("samples before training", "grid_before.png"), ("samples after training", "grid_after.png"),
        ("their prompts and seed", "grid_after.json"), ("reward curve", "reward_curve.png"),
        ("metrics (one JSON line per epoch)", "metrics.jsonl"), ("checkpoints", "checkpoints"),
    ]  # fmt: skip
    print(f"outputs in {run_dir}/:", file=file)
    for label, name in entries:
        if (run_dir / name).exists():
            print(f"  {label + ':':36} {run_dir / name}", file=file)
    if (run_dir / "tb").exists():
        print(f"  {'TensorBoard:':36} tensorboard --logdir {shlex.quote(str(run_dir / 'tb'))}", file=file)


def new_train_config(options: dict[str, Any], preset: str | None = None) -> TrainConfig:
    """The config of a new run from the command line's options, on ``preset``'s values when one is named."""
    options = dict(options)
    algo = options.pop("algo", TrainConfig.algo)
    return preset_config(preset, algo, **options) if preset else TrainConfig(algo=algo, **options)


def cmd_train(args: argparse.Namespace) -> int:
    from agents.distributed import run_forked
    from agents.runtime import local_plan

    overrides = given_options(args, CONFIG_FIELDS + tuple(args.algo_fields))
    if args.from_checkpoint and not args.resume:
        raise ValueError(f"--from-checkpoint {args.from_checkpoint}: expected it together with --resume RUN_DIR")
    if args.resume:
        fixed = [k for k in ("env_id", "algo") if k in overrides]
        if fixed:
            raise ValueError(f"--resume continues the run's own {' and '.join(fixed)}; expected no "
                             f"{' / '.join('--env' if k == 'env_id' else '--algo' for k in fixed)} (start a new run "
                             "for another)")  # fmt: skip
        cfg = _load_run_config(args.resume).replace(**overrides)
    else:
        cfg = new_train_config(overrides, args.preset)
    processes, threads = local_plan(cfg.validate())
    if processes == 1:
        return _train(args, cfg, overrides)
    return run_forked(processes, threads, lambda: _guarded(lambda a: _train(a, cfg, overrides), args))


def _train(args: argparse.Namespace, cfg: TrainConfig, overrides: dict[str, Any]) -> int:
    """The run of ``cmd_train`` in this process (one of several when it was forked or launched)."""
    from agents.progress import INTERRUPTED, describe_stop, finished_reason
    from agents.trainer import Trainer

    if args.resume:
        trainer = Trainer(cfg, resume=True, checkpoint=args.from_checkpoint)
        done = finished_reason(cfg, trainer.epoch, trainer.reward_queries)
        if done is not None and not trainer.dist.is_main:
            return 0
        if done is not None:
            print(f"{args.resume} is finished: "
                  f"{describe_stop(done, cfg, trainer.epoch, trainer.reward_queries).removeprefix('stopped: ')}. "
                  "To train further, resume it with a higher limit, e.g.:\n  "
                  + resume_command(trainer.run_dir, {**overrides, **_extend(cfg, done)}))  # fmt: skip
            print_outputs(trainer.run_dir)
            return 0
    else:
        trainer = Trainer(cfg)
    args.locked_run_dir = str(trainer.run_dir)  # for the advice of a failure message
    hint = resume_command(trainer.run_dir, overrides if args.resume else None)
    try:
        history = trainer.train()
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, mid-epoch
        if not trainer.dist.is_main:
            return 130
        has_ckpt = (trainer.ckpt_dir / "latest").exists()
        print(f"\nstopped at once (second Ctrl-C) during epoch {trainer.epoch + 1}; "
              + (f"the last complete checkpoint is intact. Resume with:\n  {hint}" if has_ckpt
                 else "no checkpoint was saved yet: start it again with the same command"), file=sys.stderr)  # fmt: skip
        return 130
    last = history[-1] if history else {}
    from agents.distributed import shutdown

    shutdown()  # every process of the run (a final barrier), so that none leaves while another still writes
    if not trainer.dist.is_main:
        return 130 if trainer.stop_reason == INTERRUPTED else 0
    # one summary line (under torchrun / accelerate launch: from the main process only)
    print(json.dumps({"run_dir": str(trainer.run_dir), "epochs": trainer.epoch,
                      "reward_mean": last.get("charts/reward_mean"), "stopped_by": trainer.stop_reason}))  # fmt: skip
    print(describe_stop(trainer.stop_reason, trainer.cfg, trainer.epoch, trainer.reward_queries, trainer.last_epoch_s))
    print_outputs(trainer.run_dir)
    if trainer.stop_reason == INTERRUPTED:
        if (trainer.ckpt_dir / "latest").exists():
            print(f"checkpoint of epoch {trainer.epoch} saved. Resume with:\n  {hint}")
        else:
            print("no epoch finished, so there is nothing to resume: start it again with the same command")
        return 130
    return 0


def _extend(cfg: TrainConfig, reason: str) -> dict[str, Any]:
    flag, value = (("reward_query_budget", 2 * cfg.reward_query_budget) if reason == "reward_query_budget"
                   else ("num_epochs", 2 * cfg.num_epochs))  # fmt: skip
    return {flag: value}


def cmd_eval(args: argparse.Namespace) -> int:
    from agents.evaluate import evaluate_policy, heldout_prompt_set
    from agents.trainer import Trainer

    cfg = _load_run_config(args.run).replace(progress=False)
    trainer = Trainer(cfg, resume=True)
    train_prompts = cfg.env_kwargs.get("prompts") or __import__("gymnasium").spec(cfg.env_id).kwargs["prompts"]
    result: dict[str, Any] = {"run": args.run, "epoch": trainer.epoch, "seed": args.seed}
    for split, prompts in (("train", train_prompts), ("heldout", heldout_prompt_set(cfg))):
        if prompts is None:
            continue
        r = evaluate_policy(cfg, trainer.policy, prompts, args.num_samples, args.seed)
        r.pop("images")
        result[split] = r
    out = Path(args.out or Path(args.run) / "eval.json")
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: (v["reward_mean"] if isinstance(v, dict) else v) for k, v in result.items()}))
    print(f"wrote {out} (rewards, prompts and seed of every sample)")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from agents.plots import save_labelled_grid
    from agents.trainer import Trainer

    if args.run:
        trainer = Trainer(_load_run_config(args.run).replace(progress=False), resume=True)
    elif args.env:
        import tempfile

        trainer = Trainer(TrainConfig(env_id=args.env, run_dir=tempfile.mkdtemp(prefix="denoise-sample-"), progress=False))
    else:
        raise SystemExit("error: sample needs --run RUN_DIR or --env ID")
    prompts = args.prompt or trainer.eval_prompts()
    images = trainer.sample_images(list(prompts), seed=args.seed)
    png, js = save_labelled_grid(Path(args.out), images, list(prompts), seed=args.seed, scale=args.scale,
                                 title=f"{args.run or args.env}, epoch {trainer.epoch}")  # fmt: skip
    print(f"wrote {png} (prompts and seed: {js})")
    return 0


def _listing(title: str, rows: list[tuple[str, str]]) -> str:
    width = max((len(name) for name, _ in rows), default=0)
    return title + "\n" + "\n".join(f"  {name:{width}}  {text}" for name, text in rows)


def registered_listing() -> str:
    """The registered algorithms and environments, one line each (the train command's epilog)."""
    import gymnasium as gym

    import diffusion_env  # noqa: F401  (registers the Denoise-* IDs)
    from agents.registry import describe_algo, registered_algos
    from diffusion_env.registration import describe_env

    algos = [(a, describe_algo(a)) for a in registered_algos()]
    envs = [(e, describe_env(e)) for e in sorted(gym.registry) if e.startswith("Denoise-")]
    return _listing("algorithms (--algo):", algos) + "\n\n" + _listing("environments (--env):", envs)


TRAIN_DESCRIPTION = """Train a policy on a registered environment with a registered algorithm.

Options not given take the default shown (TrainConfig, agents/config.py), or with --preset the preset's
value for --algo. Ctrl-C stops after the current epoch's checkpoint and prints the command that resumes
the run; a second Ctrl-C stops at once."""


def algo_of_command_line(argv: list[str]) -> str:
    """The algorithm a ``train`` command line is about: its ``--algo``, else that of the run ``--resume`` names
    (read from its config.json when readable), else the default."""
    for i, arg in enumerate(argv):
        if arg == "--algo" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--algo="):
            return arg.split("=", 1)[1]
    runs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--resume"]
    runs += [a.split("=", 1)[1] for a in argv if a.startswith("--resume=")]
    if runs:
        try:
            return str(json.loads((Path(runs[0]) / "config.json").read_text())["algo"])
        except (OSError, ValueError, KeyError, TypeError):  # reported when the run is loaded
            pass
    return TrainConfig.algo


def add_algo_options(parser: argparse.ArgumentParser, algo: str) -> list[str]:
    """The options of ``algo``'s own config fields, as a group of ``parser``; returns the field names."""
    from agents.registry import find_algo

    spec = find_algo(algo) or find_algo(TrainConfig.algo)
    cls = spec.config
    fields = [f.name for f in dataclasses.fields(cls)]
    group = parser.add_argument_group(
        f"options of {spec.name} ({cls.__module__}.{cls.__qualname__}; another algorithm's: --algo NAME --help)",
        None if fields else f"{spec.name} has no settings of its own.",
    )
    return add_dataclass_options(group, cls)


def unknown_option_message(option: str, algo: str, algo_fields: list[str]) -> str:
    """One line for an option the chosen algorithm does not have: whose option it is, and the known ones."""
    from agents.config import algo_config_class
    from agents.registry import registered_algos

    name = option.split("=", 1)[0].removeprefix("--").removeprefix("no-").replace("-", "_")
    owners = [a for a in registered_algos() if name in [f.name for f in dataclasses.fields(algo_config_class(a))]]
    whose = f" (an option of {', '.join(owners)})" if owners else ""
    known = ", ".join("--" + f.replace("_", "-") for f in algo_fields) or "none"
    return (f"{option.split('=', 1)[0]}: algorithm {algo!r} has no such option{whose}; expected one of its own "
            f"({known}) or a shared one (see `denoise-gym train --algo {algo} --help`)")


def build_parser(algo: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; ``train`` takes the options of ``algo``'s config (default: the default
    algorithm's)."""
    from agents.registry import registered_algos

    parser = OneLineParser(prog="denoise-gym", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure (any position)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,sample}")
    p = sub.add_parser("train", help="train a policy", description=TRAIN_DESCRIPTION,
                       epilog=registered_listing(), formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from a preset for --algo: 'tiny' (the embedded tiny models, Denoise-Tiny-* and "
                        "Denoise-TinyFlow-*, on a CPU), 'sd14' (DDPO appendix A.6, a GPU) or 'sd35' (Flow-GRPO's "
                        "SD3.5-Medium LoRA settings, a GPU); the options given override it (default: none)")  # fmt: skip
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest checkpoint; options given change its "
                        "settings, e.g. --num-epochs to train further (default: start a new run)")  # fmt: skip
    p.add_argument("--from-checkpoint", metavar="NAME",
                   help="with --resume: continue from this checkpoint folder of RUN_DIR/checkpoints, e.g. "
                        "ckpt-0003 (default: the one checkpoints/latest names)")  # fmt: skip
    add_dataclass_options(p, TrainConfig, skip=("algo_config",), choices={"algo": registered_algos()},
                          flags={"env_id": "--env"},
                          notes={"env_id": "The registered IDs are listed below.",
                                 "algo": "Each is described below."})  # fmt: skip
    algo_fields = add_algo_options(p, algo or TrainConfig.algo)
    p.set_defaults(func=cmd_train, algo_fields=algo_fields, algo_name=algo or TrainConfig.algo)
    p = sub.add_parser("eval", help="reward of a run's checkpoint on training and held-out prompts",
                       description="Mean reward of a run's latest checkpoint at fixed seeds, on the training "
                                   "prompts and on the held-out prompt set.", formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="the run directory to evaluate (required)")
    p.add_argument("--num-samples", type=int, default=64, metavar="INT",
                   help="samples per prompt split (default: 64)")  # fmt: skip
    p.add_argument("--seed", type=int, default=10_000, metavar="INT",
                   help="seed of the evaluation samples; the same for every run (default: 10000)")  # fmt: skip
    p.add_argument("--out", metavar="PATH", help="where the JSON goes (default: RUN_DIR/eval.json)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("sample", help="an image grid for given prompts",
                       description="Sample one image per prompt and save them as a grid labelled with the "
                                   "prompts and the seed, plus a JSON of both.", formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--run", metavar="RUN_DIR", help="sample from this run's latest checkpoint")
    p.add_argument("--env", metavar="ID", help="or: sample from this environment's base model")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt; repeat for several (default: the run's evaluation prompts)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1234, metavar="INT", help="sampling seed (default: 1234)")
    p.add_argument("--scale", type=int, default=4, metavar="INT",
                   help="pixel magnification of the images (default: 4)")  # fmt: skip
    p.add_argument("--out", default="samples.png", metavar="PATH",
                   help="the PNG; its prompts go next to it as .json (default: samples.png)")  # fmt: skip
    p.set_defaults(func=cmd_sample)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {errors.one_line(str(message))}\n"


def _run_dir_of(args: argparse.Namespace) -> str | None:
    names = ("locked_run_dir", "resume", "run", "run_dir")
    return next((getattr(args, n) for n in names if getattr(args, n, None)), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere, not only before the subcommand
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(algo_of_command_line(argv)) if argv[:1] == ["train"] else build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        option = next((a for a in unknown if a.startswith("--")), None)
        if option is None or getattr(args, "command", None) != "train":
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
        train.exit(2, f"{train.prog}: error: {unknown_option_message(option, args.algo_name, args.algo_fields)}\n")
    import warnings

    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    args.debug = debug
    try:
        return _guarded(args.func, args)
    finally:
        warnings.formatwarning = formatwarning


def _guarded(func, args: argparse.Namespace) -> int:
    """``func(args)``, with an expected failure said in one line (its traceback too under ``--debug``)."""
    try:
        return func(args)
    except (Exception, KeyboardInterrupt) as exc:
        failure = errors.classify(exc, run_dir=_run_dir_of(args))
        if failure is None:  # not an expected failure: a bug, show everything
            raise
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {failure.message}", file=sys.stderr)
        return failure.code


if __name__ == "__main__":
    sys.exit(main())
