"""SFT throughput with packing on vs off, measured side by side in one run.

    .venv/bin/python scripts/bench_sft_packing.py [--epochs 1] [--repeats 2] [--out runs/bench/sft_packing.json]
    .venv/bin/python scripts/bench_sft_packing.py --recipe recipes/smollm2-135m/sft.yaml --max-samples 256 \
        --out runs/bench/sft_packing_smollm2.json

By default both arms train the demo's tiny model on the demo data. With `--recipe`, they train that
recipe's model on its data as the recipe says (LoRA, precision, micro batch), on its first
`--max-samples` examples. Both arms see the same examples for whole epochs, so exactly the same
real tokens, with the same micro batch and max length. Packing puts several short examples into
each row (no cross-attention between them), so fewer padding tokens are computed and fewer steps
are needed. tokens/s counts real (non-padding) tokens. Arms alternate to spread noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rlhf.checkpoint import MANIFEST
from rlhf.config import SFTRecipe, load_recipe
from rlhf.stages.sft import run_sft

REPO = Path(__file__).resolve().parents[1]


def one_run(recipe_path: Path, data: list[str], out: Path, packing: bool, epochs: float, max_length: int) -> dict:
    recipe = load_recipe(
        SFTRecipe,
        recipe_path,
        [
            *data,
            f"output_dir={out}",
            "tracking.wandb=false",
            f"packing={str(packing).lower()}",
            f"train.num_epochs={epochs}",
            "train.max_steps=-1",
            "train.eval_steps=0",
            "train.save_steps=100000",
            "train.logging_steps=10",
            f"data.max_length={max_length}",
        ],
    )
    metrics = json.loads((run_sft(recipe) / MANIFEST).read_text())["metrics"]
    return {
        "seconds": metrics["train_seconds"],
        "tokens": metrics["tokens_seen"],
        "steps": metrics["global_step"],
        "final_loss": metrics["last_logged_loss"],
        "train_loss": metrics["train_loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--recipe", help="an SFT recipe to measure (default: the demo's, on freshly built demo assets)")
    ap.add_argument("--max-samples", type=int, help="train on this many of the data's examples (both arms)")
    ap.add_argument("--out", default="runs/bench/sft_packing.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.recipe:
            recipe_path, data = Path(args.recipe), []
        else:
            from rlhf.demo.assets import build_demo_assets

            assets = build_demo_assets(Path(tmp) / "assets")
            recipe_path = REPO / "recipes/demo/sft.yaml"
            data = [
                f"demo_assets={assets}",
                f"model.name_or_path={assets / 'base'}",
                f"data.sources.0.path={assets / 'data' / 'sft.jsonl'}",
            ]
        if args.max_samples:
            data.append(f"data.max_samples={args.max_samples}")
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for r in range(args.repeats):
            for arm in ("off", "on") if r % 2 == 0 else ("on", "off"):
                out = Path(tmp) / f"{arm}{r}"
                runs[arm].append(one_run(recipe_path, data, out, arm == "on", args.epochs, args.max_length))
        micro = load_recipe(SFTRecipe, recipe_path, data).train.micro_batch_size
    summary = {}
    for arm, rs in runs.items():
        tps = [x["tokens"] / x["seconds"] for x in rs]
        summary[arm] = {
            "tokens_per_s": statistics.median(tps),
            "seconds": statistics.median(x["seconds"] for x in rs),
            "tokens": rs[0]["tokens"],
            "steps": rs[0]["steps"],
            "runs": rs,
        }
    ratio = summary["on"]["tokens_per_s"] / summary["off"]["tokens_per_s"]
    print(
        f"\nSFT ({args.recipe or 'the demo'}): {args.epochs} epoch(s), micro batch {micro}, "
        f"max_length {args.max_length}, median of {args.repeats} alternating runs"
    )
    print(f"{'packing':<8} {'steps':>6} {'tokens':>9} {'seconds':>8} {'tokens/s':>10} {'train loss':>10}")
    for arm in ("off", "on"):
        s = summary[arm]
        print(
            f"{arm:<8} {s['steps']:>6} {s['tokens']:>9} {s['seconds']:>8.2f} {s['tokens_per_s']:>10.0f} "
            f"{s['runs'][0]['train_loss']:>10.4f}"
        )
    print(f"packing on / off tokens/s: {ratio:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "summary": summary, "ratio_on_over_off": ratio}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
