"""Does the loop earn its cost? Iterative rounds against every label collected up front.

Runs a rounds recipe as it is (K rounds of L pairs and S RL steps each), then the same recipe as
one round of K x L pairs, all sampled from the SFT policy before any RL, followed by one RL run of
K x S steps: the same label budget, the same RL steps, the same SFT model and initial reward model
(the up-front run reuses the iterative run's round 0). Prints the two round tables and the
final ground truth of each, and writes JSON.

    python scripts/compare_rounds.py --config recipes/demo/rounds.yaml --out runs/rounds_compare.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rlhf.config import load_recipe
from rlhf.config_rl import PPORecipe
from rlhf.config_rounds import RoundsRecipe
from rlhf.rounds import report
from rlhf.rounds.runner import round_dir, run_rounds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", default="runs/rounds_compare.json")
    ap.add_argument("overrides", nargs="*", help="overrides of the rounds recipe, for both runs")
    args = ap.parse_args(argv)

    iterative = load_recipe(RoundsRecipe, args.config, args.overrides)
    steps = load_recipe(PPORecipe, iterative.rl, iterative.rl_overrides).train.max_steps
    k = iterative.rounds
    t0 = time.perf_counter()
    run_rounds(iterative)
    t_iter = time.perf_counter() - t0

    zero = round_dir(iterative, 0)
    upfront = load_recipe(
        RoundsRecipe,
        args.config,
        [
            *args.overrides,
            f"output_dir={iterative.output_dir}-upfront",
            "rounds=1",
            f"labels_per_round={k * iterative.labels_per_round}",
            f"rl_overrides={json.dumps([*iterative.rl_overrides, f'train.max_steps={k * steps}'])}",
            *(["sft=null", f"sft_dir={zero / 'sft'}"] if iterative.sft else []),
            f"initial_reward_dir={iterative.initial_reward_dir or zero / 'reward'}",
        ],
    )
    t0 = time.perf_counter()
    run_rounds(upfront)
    t_up = time.perf_counter() - t0

    rows = {}
    for name, recipe in (("iterative", iterative), ("upfront", upfront)):
        report.write(Path(recipe.output_dir), recipe.rounds)
        rows[name] = json.loads(Path(recipe.output_dir, "report.json").read_text())["rounds"]
    for name, table in rows.items():
        print(f"\n## {name}\n")
        print("\n".join(report.table(table)))
    final = {name: table[-1] for name, table in rows.items()}
    labels = {name: sum(r.get("labels", 0) for r in table) for name, table in rows.items()}
    # wall s: this invocation's (rounds finished by an earlier invocation are skipped, not rerun)
    print("\n| schedule | labels | RL steps | final ground truth | final KL | final hit limit | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, secs in (("iterative", t_iter), ("upfront", t_up)):
        f = final[name]
        print(
            f"| {name} | {labels[name]} | {k * steps} | {f.get('ground_truth', float('nan')):.1f} | "
            f"{f.get('kl_to_sft', float('nan')):.3f} | {f.get('hit_length_limit', float('nan')):.3f} | {secs:.0f} |"
        )
    gt = {n: final[n].get("ground_truth", float("nan")) for n in final}
    verdict = (
        f"iterative rounds won on ground truth ({gt['iterative']:.1f} vs {gt['upfront']:.1f})"
        if gt["iterative"] > gt["upfront"]
        else f"iterative rounds did NOT win on ground truth ({gt['iterative']:.1f} vs {gt['upfront']:.1f} up front)"
    )
    print(f"\n{verdict}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "config": args.config,
                "overrides": args.overrides,
                "rounds": k,
                "rl_steps_per_round": steps,
                "labels_per_round": iterative.labels_per_round,
                "tables": rows,
                "labels": labels,
                "wall_seconds": {"iterative": round(t_iter, 1), "upfront": round(t_up, 1)},
                "verdict": verdict,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
