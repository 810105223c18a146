"""`rlhf generate` (a prompts file in, a JSONL of responses out) and `rlhf chat` (interactive).

Both take any stage output or HF directory (an adapter directory is merged on load, or run on its
base when it cannot merge) and use the same batched sampler as evaluation.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

from rlhf.config import GenerationSettings
from rlhf.data.formats import Messages, normalize_prompt
from rlhf.data.io import write_jsonl
from rlhf.data.prepare import read_whole
from rlhf.errors import DataError
from rlhf.models import default_device, load_model, load_tokenizer
from rlhf.sampling import generate, left_pad, render_prompt, response_mask_of, sample


def load_policy(path: str, device):
    """A causal LM from a full HF directory or an adapter directory (see `rlhf.models.load_model`)."""
    return load_model(path, "causal-lm", device=device).eval()


def answer_prompts(
    model_dir: str,
    prompts_path: str,
    gen: GenerationSettings,
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    greedy: bool = False,
) -> list[dict]:
    """Answer every prompt of a prompts file (any format the stages read): one row per response,
    with the prompt (messages), the decoded response and whether it hit the length limit."""
    from tqdm.auto import tqdm

    tok = load_tokenizer(model_dir)
    # deduplicate=False: one answer row per input row
    prompts = read_whole(prompts_path, normalize_prompt, deduplicate=False, key="--prompts")
    device = default_device()
    model = load_policy(model_dir, device)
    ids = [render_prompt(tok, p) for p in prompts]
    rows = []
    for start in tqdm(range(0, len(ids), batch_size), desc="generate"):
        s = sample(
            model,
            tok,
            ids[start : start + batch_size],
            samples,
            gen,
            seed + start,
            batch_size * samples,
            device,
            greedy=greedy,
        )
        for i, resp, hit in zip(s.prompt_index, s.responses, s.hit_limit):
            rows.append(
                {
                    "prompt": prompts[start + i],
                    "response": tok.decode(resp, skip_special_tokens=True).strip(),
                    "model": model_dir,
                    "hit_length_limit": hit,
                }
            )
    return rows


def generate_file(
    model_dir: str,
    prompts_path: str,
    out_path: str,
    gen: GenerationSettings,
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    greedy: bool = False,
) -> int:
    """`rlhf generate`: answer every prompt of a prompts file into a JSONL; returns rows written."""
    rows = answer_prompts(model_dir, prompts_path, gen, samples, seed, batch_size, greedy)
    write_jsonl(rows, out_path)
    return len(rows)


def replay_file(model_dir: str, questions_path: str, out_path: str, max_new_tokens: int = 48) -> dict[str, int]:
    """`rlhf data replay`: a model's own greedy answers to general questions, as SFT rows
    (prompt / completion) to mix into SFT and PPO-ptx against forgetting (rehearsal).

    Greedy, like the forgetting measure's reference (`rlhf.eval.forgetting`). An answer that hits
    `max_new_tokens` is cut after its last complete sentence, because SFT ends every completion
    with eos and would otherwise teach the model to stop mid-sentence; one with no complete
    sentence is dropped. Both are counted."""
    rows = answer_prompts(model_dir, questions_path, GenerationSettings(max_new_tokens=max_new_tokens), greedy=True)
    kept, cut = [], 0
    for r in rows:
        text = last_sentences(r["response"]) if r["hit_length_limit"] else r["response"]
        if text:
            kept.append({"prompt": r["prompt"], "completion": text})
            cut += text != r["response"]
    if not kept:
        raise DataError(
            f"{questions_path}: none of the {len(rows)} greedy answers of {model_dir} has a complete "
            f"sentence within max_new_tokens={max_new_tokens}; raise --max-new-tokens"
        )
    write_jsonl(kept, out_path)
    return {"questions": len(rows), "written": len(kept), "cut_at_sentence": cut, "dropped": len(rows) - len(kept)}


# A sentence end: . ! or ? (closing quotes or brackets may follow) before whitespace or the end,
# but not the dot of a list number ("2."), an initial ("J."), or a common abbreviation.
_SENTENCE_END = re.compile(r"(?<![A-Za-z0-9][.])(?<!\b[0-9A-Z])(?<!\b[0-9]{2})[.!?]+[\"')\]]*(?=\s|$)")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "no.")
_LIST_STUB = re.compile(r"(?:\n|^)\s*(?:\d+[.)]|[-*•])\s*$")


def last_sentences(text: str) -> str:
    """`text` up to and including its last sentence end, or "" when it has none. A list cut in the
    middle keeps its complete items and loses the number or bullet of the one cut off."""
    ends = [
        m.end()
        for m in _SENTENCE_END.finditer(text)
        if not text[: m.end()].lower().endswith(_ABBREVIATIONS) and not _LIST_STUB.search(text[: m.end()])
    ]
    return text[: ends[-1]].strip() if ends else ""


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
