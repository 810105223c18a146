"""Hub ids for models and datasets, resolved through a pre-populated Hugging Face cache in offline
mode (no network is used or needed), and the clear error when the files are not there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

from conftest import REPO

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(hf_home, kind: str, repo: str, fill) -> None:
    """Lay out `repo` in the hub cache as huggingface_hub writes it: a snapshot and refs/main."""
    root = hf_home / "hub" / f"{kind}s--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    fill(snapshot)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


def test_models_and_datasets_by_hub_id_from_an_offline_cache(sft_dir, tmp_path):
    hf_home = tmp_path / "hf"
    _cache_repo(
        hf_home, "model", "demo-org/tiny-chat", lambda d: [shutil.copy(p, d) for p in sft_dir.iterdir() if p.is_file()]
    )

    def dataset(d):
        (d / "data").mkdir()
        (d / "data" / "train.jsonl").write_text(
            "".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(5))
        )
        (d / "data" / "test.jsonl").write_text(json.dumps({"prompt": "t", "chosen": "a", "rejected": "b"}) + "\n")

    _cache_repo(hf_home, "dataset", "demo-org/prefs", dataset)
    script = textwrap.dedent("""
        import json
        from rlhf.data.io import read_rows, fingerprint
        from rlhf.errors import DataError, HandoffError
        from rlhf.models import load_model, load_tokenizer
        out = {}
        model = load_model("demo-org/tiny-chat", "causal-lm")
        out["params"] = sum(p.numel() for p in model.parameters())
        out["eos"] = load_tokenizer("demo-org/tiny-chat").eos_token
        out["train"] = len(read_rows("demo-org/prefs", "train"))
        out["test"] = [r.where for r in read_rows("demo-org/prefs", "test")]
        out["fingerprint"] = len(fingerprint("demo-org/prefs"))
        for what, call in (("model", lambda: load_model("demo-org/not-cached", "causal-lm")),
                           ("data", lambda: read_rows("demo-org/not-cached-data")),
                           ("split", lambda: read_rows("demo-org/prefs", "validation")),
                           ("typo", lambda: load_model("no/such/dir/here", "causal-lm"))):
            try:
                call()
                out[what] = "no error"
            except (DataError, HandoffError) as e:
                out[what] = str(e)
        print(json.dumps(out))
    """)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_home / "hub")}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    from transformers import AutoModelForCausalLM

    assert got["params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(sft_dir).parameters())
    assert got["train"] == 5 and got["test"] == ["demo-org/prefs[test]:row 1"] and got["fingerprint"] == 64
    assert "'demo-org/not-cached' is not a local directory and could not be fetched" in got["model"]
    assert "hf download demo-org/not-cached" in got["model"] and "HF_HUB_OFFLINE=1" in got["model"]
    assert "hf download --repo-type dataset demo-org/not-cached-data" in got["data"]
    assert "split 'validation'" in got["split"]
    assert "is not a directory" in got["typo"]
