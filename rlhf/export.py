"""`rlhf export`: turn a stage output into a standalone HF directory for deployment.

A LoRA-style adapter (a stage run with `peft.merge_on_export: false`, or the `adapter/` kept beside a
merged export) is merged into its base with PEFT's `merge_and_unload`; a full model is copied
as is. The manifest travels along (marked as exported), so the result still feeds the next stage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlhf.adapters import is_mergeable, saved_adapter_type
from rlhf.checkpoint import MANIFEST, now, write_json_atomic
from rlhf.errors import HandoffError
from rlhf.models import adapter_base, merge_adapter


def export(src: str | Path, out: str | Path) -> Path:
    """Write a standalone model directory to `out`; refuses to overwrite a non-empty directory."""
    from transformers import AutoTokenizer

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise HandoffError(f"{src} is not a directory")
    if out.exists() and any(out.iterdir()):
        raise HandoffError(f"{out} exists and is not empty; choose a new directory")
    kind = saved_adapter_type(src)
    if kind is not None and not is_mergeable(kind):
        raise HandoffError(
            f"{src} holds a {kind.lower()} adapter, which cannot be merged into the model's weights; "
            "serve it with its base as it is (`rlhf generate` and `rlhf chat` load it), or retrain with "
            "a mergeable method (peft.method lora, dora, qlora, loha, lokr or ia3)"
        )
    out.mkdir(parents=True, exist_ok=True)
    if adapter_base(src):
        task = json.loads((src / "adapter_config.json").read_text()).get("task_type")
        tok = AutoTokenizer.from_pretrained(src)
        merged = merge_adapter(src, "scorer" if task == "SEQ_CLS" else "causal-lm")
        merged.config.pad_token_id = tok.pad_token_id  # a scorer's head reads the last token before this id
        merged.save_pretrained(out)
        tok.save_pretrained(out)
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
