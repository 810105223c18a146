"""Hugging Face Hub names (`Qwen/Qwen2.5-0.5B-Instruct`, `HuggingFaceH4/ultrafeedback_binarized`)
where a local path is expected, resolved through the normal Hugging Face cache.

A local path always wins. Anything else that looks like `owner/name` (optionally `owner/name@revision`)
is fetched with `huggingface_hub.snapshot_download`, which reuses the cache (`HF_HOME`, or
`HF_HUB_CACHE`) and works offline (`HF_HUB_OFFLINE=1`) when the files are already there. When the
files are neither cached nor reachable, the error says how to fetch them ahead of time. Downloads
happen only for names a recipe gives, never for anything the project itself needs.
"""

from __future__ import annotations

import re
from pathlib import Path

from rlhf.errors import HandoffError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def is_hub_id(name: str) -> bool:
    """`owner/name` or `owner/name@revision` that is not an existing local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists() and not name.startswith((".", "/"))


def local_dir(name: str, what: str, repo_type: str = "model") -> str:
    """A local directory for `name`: the path itself, or the cached snapshot of a hub repository."""
    if Path(name).is_dir():
        return name
    if not is_hub_id(name):
        raise HandoffError(
            f"{what} {name!r} is not a directory (expected a local HuggingFace {repo_type} directory "
            f"or a hub id such as owner/name)"
        )
    repo, _, revision = name.partition("@")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, repo_type=repo_type, revision=revision or None)
    except Exception as e:  # offline, unreachable, unknown repo, gated: all one answer for the user
        fetch = (
            "hf download"
            + (" --repo-type dataset" if repo_type == "dataset" else "")
            + f" {repo}"
            + (f" --revision {revision}" if revision else "")
        )
        raise HandoffError(
            f"{what} {name!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'}). On a machine with "
            f"network, fetch it ahead of time with `{fetch}` (it lands in the cache, HF_HOME), then run with "
            "HF_HUB_OFFLINE=1 and the same HF_HOME; or download it to a directory and give that path."
        ) from None
