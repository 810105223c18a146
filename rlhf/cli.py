"""The `rlhf` command: one sub-command per stage plus helpers.

    rlhf sft --config recipes/demo/sft.yaml train.max_steps=20 output_dir=runs/try1
    rlhf reward --config recipes/demo/reward.yaml
    rlhf ppo --config recipes/demo/ppo.yaml
    rlhf sft --config recipes/demo/sft.yaml --dry-run       # print the resolved recipe, run nothing
    rlhf demo build --out runs/demo/assets                  # tokenizer, tiny model, task data

Recipes are validated before anything heavy is imported, so a typo fails in about a second.
Under the `deepspeed` launcher the scripts in `scripts/` call `main()` with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from rlhf.config import STAGES, ConfigError, dump_yaml, load_recipe
from rlhf.config_run import RECIPES


def _run_stage(stage: str) -> Callable[[object], object]:
    if stage == "sft":
        from rlhf.stages.sft import run_sft

        return run_sft
    if stage == "reward":
        from rlhf.stages.reward import run_reward

        return run_reward
    if stage == "ppo":
        from rlhf.stages.ppo.trainer import run_ppo

        return run_ppo
    if stage == "eval":
        from rlhf.eval.run import run_eval

        return run_eval
    if stage == "pipeline":
        from rlhf.pipeline import run_pipeline

        return run_pipeline
    raise ConfigError(f"unknown stage {stage!r}")  # pragma: no cover - argparse limits the choices


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe values to override")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe (defaults filled in) and exit")
    # The deepspeed launcher appends --local_rank=N; the rank also arrives in LOCAL_RANK.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage, cls in RECIPES.items():
        _add_recipe_args(sub.add_parser(stage, help=(cls.__doc__ or "").split("\n")[0]))
    demo = sub.add_parser("demo", help="demo helpers")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    build = demo_sub.add_parser("build", help="build the demo tokenizer, tiny base model and task data")
    build.add_argument("--out", default="runs/demo/assets")
    build.add_argument("--seed", type=int, default=0)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in RECIPES:
        recipe = load_recipe(RECIPES[args.command], args.config, args.overrides)
        if args.dry_run:
            print(dump_yaml(recipe), end="")
            return 0
        out = _run_stage(args.command)(recipe)
        print(f"[rlhf] {args.command} output: {out}")
        return 0
    if args.command == "demo" and args.demo_command == "build":
        from rlhf.demo.assets import build_demo_assets

        print(f"[rlhf] demo assets: {build_demo_assets(args.out, args.seed)}")
        return 0
    raise AssertionError(args)  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rlhf.checkpoint import HandoffError
    from rlhf.data.io import DataError

    try:
        return _dispatch(args)
    except (ConfigError, DataError, HandoffError) as e:
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # Failures with a message meant for the user (not bugs): the PPO guard and a failed pipeline stage.
        if type(e).__name__ not in ("PPOAborted", "StageFailed"):
            raise
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
