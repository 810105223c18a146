"""`rlhf label ...`: create a labelling project, add or revoke annotators, serve the app, stats, export."""

from __future__ import annotations

import argparse
import json
import math


def add_parser(sub) -> None:
    label = sub.add_parser("label", help="collect human preference data (web app for annotators)")
    cmds = label.add_subparsers(dest="label_command", required=True)
    for build in (_init_parser, _annotator_parsers, _serve_parser, _stats_parser, _export_parser):
        build(cmds)


def _init_parser(cmds) -> None:
    init = cmds.add_parser("init", help="create a project: prompts, candidate responses, pairs to label")
    init.add_argument("--db", default="labels.sqlite", help="SQLite file, or a URL (postgresql+psycopg://...)")
    init.add_argument("--prompts", help="prompts file (rows with 'prompt' or 'messages')")
    init.add_argument("--policy", help="model directory that writes the candidates")
    init.add_argument("--policy-b", help="a second model: pairs are then A's answer against B's")
    init.add_argument("--samples", type=int, default=2, help="candidates per prompt (split over both policies)")
    init.add_argument("--candidates", help="JSONL of ready candidates {prompt, response, model} instead")
    init.add_argument(
        "--mode",
        choices=["pairs", "single"],
        default="pairs",
        help="pairs: which of two answers is better (reward model, DPO); single: is one answer good or bad (KTO)",
    )
    init.add_argument("--overlap", type=int, default=1, help="annotators per pair (>1 measures agreement)")
    init.add_argument("--reward-model", help="serve the pairs it is least certain about first")
    init.add_argument("--max-new-tokens", type=int, default=64)
    init.add_argument("--temperature", type=float, default=1.0)
    init.add_argument("--seed", type=int, default=0)


def _annotator_parsers(cmds) -> None:
    add = cmds.add_parser("add-annotator", help="create an annotator and print their access token")
    add.add_argument("name")
    add.add_argument("--db", default="labels.sqlite")
    add.add_argument("--admin", action="store_true", help="may open the statistics page")
    rev = cmds.add_parser("revoke", help="revoke an annotator's token and end their sessions (labels stay)")
    rev.add_argument("name")
    rev.add_argument("--db", default="labels.sqlite")


def _serve_parser(cmds) -> None:
    serve = cmds.add_parser("serve", help="start the web app")
    serve.add_argument("--db", default="labels.sqlite")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="127.0.0.1 (default), behind a TLS reverse proxy; anything else is plain HTTP on "
        "the network (a warning says so)",
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--secure-cookies",
        action="store_true",
        help="mark cookies Secure (behind TLS); on by itself when a proxy on this machine sends "
        "X-Forwarded-Proto: https",
    )
    serve.add_argument(
        "--lease-minutes", type=float, default=10.0, help="how long a served pair stays reserved for its annotator"
    )
    serve.add_argument("--session-hours", type=float, default=12.0, help="how long a browser sign-in lasts")


def _stats_parser(cmds) -> None:
    st = cmds.add_parser("stats", help="labels per annotator, throughput, agreement, tie and both-bad rates")
    st.add_argument("--db", default="labels.sqlite")
    st.add_argument("--json", action="store_true")


def _export_parser(cmds) -> None:
    exp = cmds.add_parser(
        "export",
        help="write preference pairs in the reward stage's format (single mode: judged responses in the KTO format)",
    )
    exp.add_argument("--db", default="labels.sqlite")
    exp.add_argument("--out", required=True)
    exp.add_argument(
        "--ties",
        choices=["keep", "drop"],
        default="keep",
        help="keep majority ties as tie rows (the reward recipe decides) or drop them",
    )
    exp.add_argument("--min-labels", type=int, default=1, help="pairs with fewer labels are left out")
    exp.add_argument("--margin-scale", type=float, default=0.5, help="margin = scale x (strength - 1)")


def run(args: argparse.Namespace) -> int:
    import sys

    from rlhf.errors import RlhfError

    try:
        return _run(args)
    except (RlhfError, ValueError, FileExistsError, FileNotFoundError) as e:  # the user's to fix: say it, exit 2
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    """One `rlhf label` subcommand: each has its own function below."""
    handler = {
        "init": _init,
        "add-annotator": _add_annotator,
        "revoke": _revoke,
        "serve": _serve,
        "stats": _stats,
        "export": _export,
    }[args.label_command]
    handler(args)
    return 0


def _init(args: argparse.Namespace) -> None:
    from rlhf.config import GenerationSettings
    from rlhf.label import project

    if args.overlap < 1 or args.samples < 1:
        raise ValueError("--overlap and --samples must be >= 1")
    gen = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    made = project.init_project(
        args.db,
        prompts_path=args.prompts,
        policy=args.policy,
        policy_b=args.policy_b,
        samples=args.samples,
        candidates_path=args.candidates,
        overlap=args.overlap,
        reward_model=args.reward_model,
        gen=gen,
        seed=args.seed,
        mode=args.mode,
    )
    if args.mode == "single":
        print(f"[rlhf] {args.db}: {made['prompts']} prompts, {made['pairs']} responses to judge good or bad")
    else:
        print(
            f"[rlhf] {args.db}: {made['prompts']} prompts, {made['pairs']} pairs to label "
            f"({made['identical_skipped']} pairs of identical answers left out)"
        )


def _add_annotator(args: argparse.Namespace) -> None:
    from rlhf.label import store

    token = store.add_annotator(store.connect(args.db), args.name, args.admin)
    print(
        f"[rlhf] annotator {args.name!r}{' (admin)' if args.admin else ''}; their access token "
        f"(shown once, stored only as a hash):\n{token}"
    )


def _revoke(args: argparse.Namespace) -> None:
    from rlhf.label import store

    ended = store.revoke(store.connect(args.db), args.name)
    print(
        f"[rlhf] revoked {args.name!r}: their token no longer works and {ended} browser session(s) ended; "
        "their labels stay"
    )


def _serve(args: argparse.Namespace) -> None:
    from rlhf.label.server import Settings, serve

    if args.lease_minutes <= 0 or args.session_hours <= 0:
        raise ValueError("--lease-minutes and --session-hours must be > 0")
    settings = Settings(
        lease_s=60 * args.lease_minutes, session_s=3600 * args.session_hours, secure_cookies=args.secure_cookies
    )
    serve(args.db, args.host, args.port, settings)


def _stats(args: argparse.Namespace) -> None:
    from rlhf.label import project, store

    s = project.stats(store.connect(args.db))
    if args.json:
        print(json.dumps(s, indent=2))
        return
    f = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    print(
        f"{s['labels']} labels on {s['labelled_pairs']} of {s['pairs']} pairs; tie rate {f(s['tie_rate'])}, "
        f"both-bad rate {f(s['both_bad_rate'])}"
    )
    print(
        f"agreement on {s['overlapping_pairs']} overlapping pairs: raw {f(s['raw_agreement'])}, "
        f"Fleiss' kappa {f(s['fleiss_kappa'])}, mean Cohen's kappa {f(s['cohen_kappa_mean'])}"
    )
    for name, a in s["annotators"].items():
        print(f"  {name:<20} {a['labels']:>6} labels  {f(a['per_hour']):>8} per hour")


def _export(args: argparse.Namespace) -> None:
    from rlhf.label import project, store

    counts = project.export(store.connect(args.db), args.out, args.ties, args.min_labels, args.margin_scale)
    print(export_message(counts, args.out))


def export_message(counts: dict[str, int], out: str) -> str:
    """What was written (clear preferences and ties) and, apart, what was left out and why."""
    if "good" in counts:  # a single-response project
        left = ", ".join(
            f"{counts[k]} {k.replace('_', ' ')}"
            for k in ("unlabelled", "too_few_labels", "split_votes")
            if counts.get(k)
        )
        return (
            f"[rlhf] wrote {counts['written']} judged responses to {out} ({counts['good']} good, "
            f"{counts['bad']} bad); left out: {left or 'none'}"
        )
    written = f"{counts['preferences']} with a clear preference, {counts['ties']} ties"
    left = ", ".join(
        f"{counts[k]} {k.replace('_', ' ')}"
        for k in ("unlabelled", "too_few_labels", "both_bad", "ties_dropped")
        if counts.get(k)
    )
    return f"[rlhf] wrote {counts['written']} preference pairs to {out} ({written}); left out: {left or 'none'}"
