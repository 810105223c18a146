"""Estimated memory per GPU for each stage of the GPU recipes (see rlhf/memory.py for the formulas).

    .venv/bin/python scripts/estimate_memory.py [recipes/llama3-8b ...] [--out runs/bench/memory.json]
    .venv/bin/python scripts/estimate_memory.py --measured runs/smollm2/sft runs/smollm2/reward ...

Each stage is estimated as shipped and with LoRA switched on (peft.enabled=true), from the
model's architecture (recipes/<model>/architecture/config.json, built on the meta device for the
exact parameter count), the recipe's batch / length / ZeRO / offload values and the pipeline's
number of GPUs. With `--measured`, each finished stage output is estimated from the recipe its
manifest records and printed beside the peak memory that stage measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from rlhf.memory import estimate_recipe_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="*", help="recipe directories (default: every one with an architecture/)")
    ap.add_argument("--out", default=str(REPO / "runs/bench/memory.json"))
    ap.add_argument("--measured", nargs="+", metavar="STAGE_OUTPUT", help="compare with these outputs' measured peaks")
    args = ap.parse_args()
    if args.measured:
        return compare_measured(args.measured, args.out)
    dirs = [Path(d) for d in args.dirs] or sorted(p.parent for p in (REPO / "recipes").glob("*/architecture"))
    results = {}
    for d in dirs:
        est = estimate_recipe_dir(d)
        lora = estimate_recipe_dir(d, peft=True)
        results[d.name] = {"shipped": est, "lora": lora}
        print(f"\n{d.name}: {est['params'] / 1e9:.2f}B parameters, {est['world']} GPU(s); GB per GPU")
        print(
            f"{'stage':<8} {'variant':<9} {'states':>8} {'frozen':>8} {'gen':>8} {'activ.':>8} "
            f"{'CPU/rank':>9} {'total':>8}"
        )
        for stage in est["stages"]:
            for name, e in (("shipped", est), ("LoRA", lora)):
                s = e["stages"][stage]
                print(
                    f"{stage:<8} {name:<9} {s['model_states']:>8.1f} {s.get('frozen_models', 0):>8.1f} "
                    f"{s.get('generation', 0):>8.1f} {s['activations']:>8.1f} {s['cpu_per_rank']:>9.1f} "
                    f"{s['total']:>8.1f}"
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


def compare_measured(outputs: list[str], out: str) -> None:
    from rlhf.memory import estimate_stage_output

    rows = [estimate_stage_output(d) for d in outputs]
    print(f"{'output':<40} {'stage':<7} {'estimate GB':>11} {'measured GB':>11} {'measured / est.':>15}  measured as")
    for r in rows:
        ratio = r["measured_gb"] / r["estimate_gb"]
        print(
            f"{r['output']:<40} {r['stage']:<7} {r['estimate_gb']:>11.2f} {r['measured_gb']:>11.2f} "
            f"{ratio:>15.2f}  {r['measured_as']}"
        )
        if r["account"]:  # a PPO-family output records its memory at named points of the run
            print(f"  {'marked point':<14} {'in use GB':>9} {'peak rise GB':>12} {'estimate GB':>11}  estimate parts")
            for a in r["account"]:
                est = "-" if a["estimated_gb"] is None else f"{a['estimated_gb']:.2f}"
                print(
                    f"  {a['mark']:<14} {a['now_gb']:>9.2f} {a['peak_rise_gb']:>12.2f} {est:>11}  "
                    f"{' + '.join(a['parts']) or '(not estimated)'}"
                )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"measured": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
