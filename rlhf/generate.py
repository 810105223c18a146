"""`rlhf generate` (a prompts file in, a JSONL of responses out) and `rlhf chat` (interactive).

Both take any stage output or HF directory (an adapter directory is merged on load, or run on its
base when it cannot merge) and use the same batched sampler as evaluation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from rlhf.config import DataConfig, DataSource, GenerationSettings
from rlhf.data.formats import Messages, normalize_prompt
from rlhf.data.prepare import prepare_splits
from rlhf.models import default_device, load_model, load_tokenizer
from rlhf.sampling import generate, left_pad, render_prompt, response_mask_of, sample


def load_policy(path: str, device):
    """A causal LM from a full HF directory or an adapter directory (see `rlhf.models.load_model`)."""
    return load_model(path, "causal-lm", device=device).eval()


def generate_file(
    model_dir: str,
    prompts_path: str,
    out_path: str,
    gen: GenerationSettings,
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 32,
) -> int:
    """Answer every prompt of a prompts file (any format the stages read); returns rows written."""
    from tqdm.auto import tqdm

    tok = load_tokenizer(model_dir)
    cfg = DataConfig(
        sources=[DataSource(path=prompts_path)], validation_fraction=0.0, deduplicate=False, max_length=10**9
    )
    prompts = prepare_splits(cfg, normalize_prompt).train
    device = default_device()
    model = load_policy(model_dir, device)
    ids = [render_prompt(tok, p) for p in prompts]
    rows = []
    for start in tqdm(range(0, len(ids), batch_size), desc="generate"):
        s = sample(
            model, tok, ids[start : start + batch_size], samples, gen, seed + start, batch_size * samples, device
        )
        for i, resp in zip(s.prompt_index, s.responses):
            rows.append(
                {
                    "prompt": prompts[start + i],
                    "response": tok.decode(resp, skip_special_tokens=True).strip(),
                    "model": model_dir,
                    "hit_length_limit": len(resp) >= gen.max_new_tokens,
                }
            )
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return len(rows)


def chat(
    model_dir: str,
    gen: GenerationSettings,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    system: str | None = None,
) -> None:
    """Talk to a model in the terminal; '/reset' clears the conversation, '/quit' or EOF leaves."""
    tok = load_tokenizer(model_dir)
    device = default_device()
    model = load_policy(model_dir, device)
    history: Messages = [{"role": "system", "content": system}] if system else []
    print(f"chatting with {model_dir} ('/reset' starts over, '/quit' leaves)", file=stdout, flush=True)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        ids, mask = left_pad([render_prompt(tok, history)], tok.pad_token_id)
        out = generate(model, ids.to(device), mask.to(device), gen, tok.eos_token_id, tok.pad_token_id).cpu()
        keep = int(response_mask_of(out, tok.eos_token_id)[0].sum())
        reply = tok.decode(out[0, :keep], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", file=stdout, flush=True)
