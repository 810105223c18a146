"""Every check a stage makes on what it is handed, before it spends any compute.

Each check is a named function that raises `HandoffError` with a message naming both sides.
Stages, evaluation and the pipeline call these; none of them re-implements a check.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.checkpoint import read_manifest
from rlhf.errors import HandoffError
from rlhf.models import load_tokenizer, tokenizer_signature


def parent_stage(directory: str | Path, stage: str | tuple[str, ...], needed_by: str) -> dict:
    """`directory` is a finished output of `stage` (or of one of several stages); returns the manifest."""
    return read_manifest(directory, expect_stage=stage, needed_by=needed_by)


POLICY_STAGES = ("sft", "pretrained")
"""What RL and evaluation accept as the starting policy: an SFT output, or a chat model that
`rlhf models get` converted (RL straight from an instruct model, as with verifiable rewards)."""


def merged_adapter(directory: str | Path, manifest: dict, needed_by: str) -> None:
    """A stage that starts from full weights cannot start from a LoRA adapter left unmerged."""
    peft = manifest.get("peft") or {}
    if peft and not peft.get("mergeable", True):
        raise HandoffError(
            f"{directory} holds a {peft.get('type')} adapter, which cannot be merged into weights, so "
            f"{needed_by} cannot start from it; train the SFT stage with a mergeable method (peft.method "
            "lora, dora, qlora, loha, lokr or ia3) or full fine-tuning. Evaluation, `rlhf generate` "
            "and `rlhf chat` do accept it"
        )
    if peft and not peft.get("merged", True):
        raise HandoffError(
            f"{directory} holds an unmerged adapter, which {needed_by} cannot start from; "
            f"export it first (`rlhf export {directory} NEW_DIR`), or rerun its stage with "
            "peft.merge_on_export=true"
        )


def same_tokenizer(a, a_name: str, b, b_name: str) -> None:
    """Models that exchange token ids must share vocabulary, special tokens and chat template."""
    sa, sb = tokenizer_signature(a), tokenizer_signature(b)
    diffs = [k for k in sa if sa[k] != sb[k]]
    if diffs:
        shown = "; ".join(f"{k}: {a_name}={sa[k]!r:.60} vs {b_name}={sb[k]!r:.60}" for k in diffs)
        raise HandoffError(
            f"tokenizers of {a_name} and {b_name} differ ({shown}); token ids would not mean "
            "the same text in both models"
        )


def scalar_head(directory: str | Path) -> None:
    """The reward model is a sequence-classification model with exactly one output."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(directory)
    if getattr(cfg, "num_labels", None) != 1 or not any(
        a.endswith("ForSequenceClassification") for a in cfg.architectures or []
    ):
        raise HandoffError(
            f"{directory} is not a scalar-head reward model "
            f"(architectures={cfg.architectures}, num_labels={getattr(cfg, 'num_labels', None)})"
        )


def score_position(directory: str | Path, tokenizer) -> None:
    """The head reads the last token that is not its config's pad id; that id must be the pad we pad
    with, or the score would be read on padding (a wrong reward that still looks like a number)."""
    from transformers import AutoConfig

    pad = AutoConfig.from_pretrained(directory).get_text_config().pad_token_id
    if pad != tokenizer.pad_token_id:
        raise HandoffError(
            f"the reward model at {directory} reads its score before pad id {pad}, but its "
            f"tokenizer pads with id {tokenizer.pad_token_id} ({tokenizer.pad_token!r}); set "
            "pad_token_id in its config.json to the tokenizer's"
        )


def reward_model(directory: str | Path, policy_tokenizer, policy_name: str, needed_by: str) -> dict:
    """All checks on a reward model handed to RL or evaluation; returns its manifest."""
    manifest = parent_stage(directory, "reward", needed_by)
    merged_adapter(directory, manifest, needed_by)
    tok = load_tokenizer(str(directory))
    same_tokenizer(policy_tokenizer, policy_name, tok, f"reward model ({directory})")
    scalar_head(directory)
    score_position(directory, tok)
    return manifest
