"""``denoise-gym``: train, evaluate and sample from the command line.

    denoise-gym train --env Denoise-Tiny-Compressibility-v0 --algo ddpo-is --preset tiny [--num-epochs 10 ...]
    denoise-gym train --resume runs/Denoise-Tiny-Compressibility-v0-ddpo-is-s0
    denoise-gym eval --run runs/Denoise-Tiny-Compressibility-v0-ddpo-is-s0
    denoise-gym sample --run RUN_DIR --prompt "a red circle" --prompt "a blue square" --out grid.png

Every :class:`~agents.config.TrainConfig` field is an option (``--field-name VALUE``).

Expected failures (missing weights, no checkpoint, a run directory in use, permission denied, a full
disk, an unreachable reward server, a bad option) print one line saying what failed and what to do,
and exit with a distinct code (:mod:`agents.errors`); ``--debug`` (anywhere on the line) adds the
traceback. Warnings print as one ``warning: ...`` line each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
import types
import typing
from pathlib import Path
from typing import Any

from agents import errors
from agents.config import TrainConfig, preset_config


def _parser_for(tp: Any):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        base = _parser_for(inner)
        return lambda s: None if s.lower() == "none" else base(s)
    if tp is bool:
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    if tp in (int, float, str):
        return tp
    return json.loads  # dicts (env_kwargs)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("env_id", "algo"):
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_parser_for(hints[f.name]), default=None,
                       metavar=f.name.upper())  # fmt: skip


def _load_run_config(run: str) -> TrainConfig:
    path = Path(run) / "config.json"
    if not path.exists():
        raise ValueError(f"{run} is not a run directory (no config.json); expected the folder of a run")
    cfg = TrainConfig.from_dict(json.loads(path.read_text()))
    return cfg.replace(run_dir=str(run))


def cmd_train(args: argparse.Namespace) -> int:
    from agents.trainer import Trainer

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None and f.name not in ("env_id", "algo")}  # fmt: skip
    if args.resume:
        cfg = _load_run_config(args.resume).replace(**overrides)
        trainer = Trainer(cfg, resume=True)
    else:
        if not args.env or not args.algo:
            raise SystemExit("error: train needs --env and --algo (or --resume RUN_DIR)")
        cfg = preset_config(args.preset, args.algo, env_id=args.env, **overrides) if args.preset else TrainConfig(
            env_id=args.env, algo=args.algo, **overrides
        )
        trainer = Trainer(cfg)
    args.locked_run_dir = str(trainer.run_dir)  # for the advice of a failure message
    history = trainer.train()
    last = history[-1] if history else {}
    if trainer.dist.is_main:  # under torchrun / accelerate launch: one summary line, not one per process
        print(json.dumps({"run_dir": str(trainer.run_dir), "epochs": trainer.epoch,
                          "reward_mean": last.get("charts/reward_mean")}))  # fmt: skip
    from agents.distributed import shutdown

    shutdown()
    return 0


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
    print(f"wrote {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from agents.trainer import Trainer, image_grid, save_png

    if args.run:
        trainer = Trainer(_load_run_config(args.run).replace(progress=False), resume=True)
    elif args.env:
        import tempfile

        trainer = Trainer(TrainConfig(env_id=args.env, run_dir=tempfile.mkdtemp(prefix="denoise-sample-"), progress=False))
    else:
        raise SystemExit("error: sample needs --run RUN_DIR or --env ID")
    prompts = args.prompt or trainer.eval_prompts()
    images = trainer.sample_images(list(prompts), seed=args.seed)
    save_png(image_grid(images, nrow=len(prompts)), Path(args.out), scale=args.scale)
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denoise-gym", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure (any position)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a policy")
    p.add_argument("--env", dest="env")
    p.add_argument("--algo", dest="algo")
    p.add_argument("--preset", choices=["tiny", "sd14"])
    p.add_argument("--resume", metavar="RUN_DIR")
    _add_config_options(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="reward of a run's checkpoint on training and held-out prompts")
    p.add_argument("--run", required=True)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--out")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("sample", help="an image grid for given prompts")
    p.add_argument("--run")
    p.add_argument("--env")
    p.add_argument("--prompt", action="append")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--out", default="samples.png")
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
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    import warnings

    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        failure = errors.classify(exc, run_dir=_run_dir_of(args))
        if failure is None:  # not an expected failure: a bug, show everything
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {failure.message}", file=sys.stderr)
        return failure.code
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
