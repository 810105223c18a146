"""`rlhf export`: turn a stage output into a standalone HF directory for deployment.

A LoRA adapter (a stage run with `peft.merge_on_export: false`, or the `adapter/` kept beside a
merged export) is merged into its base with PEFT's `merge_and_unload`; a full model is copied
as is. The manifest travels along (marked as exported), so the result still feeds the next stage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlhf.checkpoint import MANIFEST, HandoffError, now, write_json_atomic


def adapter_base(path: str | Path) -> str | None:
    """The base model directory of a LoRA adapter directory, or None for a full model."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        return None
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    manifest = Path(path) / MANIFEST
    if manifest.is_file():  # the stage recorded its base; prefer it (the adapter may hold a relative path)
        base = (json.loads(manifest.read_text()).get("peft") or {}).get("base") or base
    if not base or not Path(base).is_dir():
        raise HandoffError(f"the adapter at {path} needs its base model {base!r}, which is not a local directory")
    return base


def merged_model(path: str | Path):
    """Base + adapter merged into plain weights (causal LM or scalar-head reward model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base = adapter_base(path)
    task = json.loads((Path(path) / "adapter_config.json").read_text()).get("task_type")
    if task == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
    return PeftModel.from_pretrained(model, str(path)).merge_and_unload()


def export(src: str | Path, out: str | Path) -> Path:
    """Write a standalone model directory to `out`; refuses to overwrite a non-empty directory."""
    from transformers import AutoTokenizer

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise HandoffError(f"{src} is not a directory")
    if out.exists() and any(out.iterdir()):
        raise HandoffError(f"{out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    if adapter_base(src):
        merged_model(src).save_pretrained(out)
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    else:
        for p in src.iterdir():  # model, tokenizer, configs; not training checkpoints or logs
            if p.is_file() and p.name != MANIFEST and p.suffix != ".jsonl":
                shutil.copy2(p, out / p.name)
    if (src / MANIFEST).is_file():
        manifest = json.loads((src / MANIFEST).read_text())
        manifest["exported"] = {"from": str(src.resolve()), "at": now(), "merged_lora": adapter_base(src) is not None}
        if manifest.get("peft"):
            manifest["peft"] = {**manifest["peft"], "merged": True}
        write_json_atomic(out / MANIFEST, manifest)
    return out
