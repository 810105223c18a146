"""Per-GPU memory estimates for a recipe, from the model's shape: pure arithmetic, no torch.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, section 3): with mixed-precision
AdamW, Psi parameters cost 2 Psi (bf16 weights) + 2 Psi (bf16 gradients) + 12 Psi (fp32 master
weights, momentum, variance); stage 1 shards the 12 Psi, stage 2 also the gradients, stage 3 also
the weights, each over N data-parallel ranks. Offload moves the optimizer states (and, at stage
3, the weights) to CPU memory. Activations use the per-layer estimate of Korthikanti et al. 2022
(34 s b h bytes per layer without recomputation; with gradient checkpointing only each layer's
input, 2 s b h, is kept, plus one layer being recomputed), plus fp32 logits and their gradient.
These are estimates of the steady state, good to about 20%: allocator fragmentation, CUDA
context (~0.5-1 GB) and communication buckets come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


def _width(precision: str) -> int:
    """Bytes per weight, gradient or activation at a training precision."""
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know about a decoder-only transformer."""

    params: int  # all parameters
    hidden: int
    layers: int
    vocab: int
    heads: int


def model_states(
    params: int,
    trainable: int,
    zero_stage: int,
    world: int,
    precision: str = "bf16",
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict[str, float]:
    """Bytes per GPU (and per rank on CPU) of weights, gradients and optimizer states.

    `trainable` parameters get gradients and AdamW states (LoRA: the adapters only); the other
    `params - trainable` are frozen weights, sharded too at ZeRO-3.
    """
    w = _width(precision)
    weights = w * params / (world if zero_stage == 3 else 1)
    grads = w * trainable / (world if zero_stage >= 2 else 1)
    opt = 8 if precision == "fp32" else 12  # fp32 training keeps no separate master copy
    states = opt * trainable / (world if zero_stage >= 1 else 1)
    gpu = grads + (0 if offload_params else weights) + (0 if offload_optimizer else states)
    cpu = (weights if offload_params else 0) + (states if offload_optimizer else 0)
    return {"gpu": gpu, "cpu": cpu}


def activations(
    shape: Shape, micro_batch: int, seq: int, checkpointing: bool, logits: bool = True, precision: str = "bf16"
) -> float:
    """Bytes of activations for one micro-batch's forward + backward (16-bit activations; twice
    that in fp32: the formula counts 2-byte values)."""
    sbh = seq * micro_batch * shape.hidden * _width(precision) // 2
    per_layer = 34 * sbh  # attention with a fused kernel: no s^2 term (flash / sdpa)
    act = (2 * sbh * shape.layers + per_layer) if checkpointing else per_layer * shape.layers
    if logits:  # fp32 logits and their gradient
        act += 2 * 4 * seq * micro_batch * shape.vocab
    return float(act)


def kv_cache(shape: Shape, kv_heads: int, batch: int, seq: int, precision: str = "bf16") -> float:
    """Bytes of the KV cache (16-bit, or fp32) when generating `batch` sequences of `seq` tokens."""
    return float(2 * _width(precision) * shape.layers * batch * seq * kv_heads * (shape.hidden // shape.heads))


def lora_params(shape: Shape, r: int, intermediate: int, kv_heads: int) -> int:
    """Adapter parameters of rank r on every linear layer of every block (q, k, v, o, gate, up, down)."""
    head_dim = shape.hidden // shape.heads
    h, kv = shape.hidden, kv_heads * head_dim
    pairs = [(h, h), (h, kv), (h, kv), (h, h), (h, intermediate), (h, intermediate), (intermediate, h)]
    return shape.layers * sum(r * (a + b) for a, b in pairs)


def adapter_params(shape: Shape, peft, intermediate: int, kv_heads: int) -> int:
    """Trainable parameters of the recipe's PEFT method (adapters on every linear layer)."""
    lora = lora_params(shape, peft.r, intermediate, kv_heads)
    kv = kv_heads * (shape.hidden // shape.heads)
    per_method = {
        "loha": 2 * lora,  # two low-rank pairs per layer
        "ia3": shape.layers * (2 * kv + intermediate),  # keys, values, feed-forward input
        "prompt_tuning": peft.num_virtual_tokens * shape.hidden,
        "prefix_tuning": peft.num_virtual_tokens * 2 * kv * shape.layers,
    }
    return per_method.get(peft.method, lora)  # lora, qlora, dora (+ a vector), lokr (<= lora)


def stage_estimates(shape: Shape, kv_heads: int, intermediate: int, tied: bool, world: int, recipes: dict) -> dict:
    """GB per GPU for each stage recipe in `recipes` ({"sft": SFTRecipe, "reward": ..., "ppo": ...})."""
    head = 0 if tied else shape.vocab * shape.hidden  # a scorer drops the LM head, keeps a 1 x h one
    fit = _Fit(shape, kv_heads, intermediate, world)
    out = {}
    for name in ("sft", "reward"):
        if name in recipes:
            n = shape.params - (head if name == "reward" else 0)
            out[name] = _supervised_estimate(fit, recipes[name], n, logits=name == "sft")
    if "ppo" in recipes:
        out["ppo"] = _ppo_estimate(fit, recipes["ppo"], head)
    return out


@dataclass(frozen=True)
class _Fit:
    """The model and cluster every stage estimate shares."""

    shape: Shape
    kv_heads: int
    intermediate: int
    world: int

    def trainable(self, r, n: int) -> int:
        """Parameters the recipe trains of a model of n: the adapter's under PEFT, else all n."""
        return adapter_params(self.shape, r.peft, self.intermediate, self.kv_heads) if r.peft.enabled else n

    def states(self, r, n: int) -> dict[str, float]:
        """Model states (weights, gradients, optimizer) of a model of n parameters, bytes per rank."""
        ds = r.deepspeed
        trained = self.trainable(r, n)
        return model_states(
            n, trained, ds.zero_stage, self.world, r.train.precision, ds.offload_optimizer, ds.offload_params
        )


def _supervised_estimate(fit: _Fit, r, n: int, logits: bool) -> dict[str, float]:
    """SFT (with logits) or the reward model (a scorer of n parameters, no logits): GB per rank."""
    st = fit.states(r, n)
    act = activations(
        fit.shape,
        r.train.micro_batch_size,
        r.data.max_length,
        r.model.gradient_checkpointing,
        logits=logits,
        precision=r.train.precision,
    )
    return {
        "model_states": st["gpu"] / GB,
        "activations": act / GB,
        "cpu_per_rank": st["cpu"] / GB,
        "total": (st["gpu"] + act) / GB,
    }


def _undo_bytes(fit: _Fit, r) -> tuple[float, float]:
    """(GPU, CPU) bytes of the copy kl_rollback holds while training: what one actor update changes
    (`rlhf.stages.ppo.undo`): the trainable weights, the optimizer's fp32 master weights (a separate
    partition at ZeRO-1/2 even in fp32; at ZeRO-0 only under bf16) and AdamW's two moments; master
    and moments sit in CPU memory under optimizer offload."""
    if not r.ppo.rolls_back(r.deepspeed.zero_stage):
        return 0.0, 0.0
    n_train, ds = fit.trainable(r, fit.shape.params), r.deepspeed
    split = fit.world if ds.zero_stage >= 1 else 1
    master = 0 if ds.zero_stage == 0 and r.train.precision == "fp32" else 4 * n_train / split
    optimizer_copy = master + 8 * n_train / split
    gpu = _width(r.train.precision) * n_train + (0 if ds.offload_optimizer else optimizer_copy)
    return gpu, optimizer_copy if ds.offload_optimizer else 0.0


def _ppo_estimate(fit: _Fit, r, head: int) -> dict[str, float]:
    """PPO and its critic-free relatives: GB per rank, generation and training being separate phases."""
    shape, world = fit.shape, fit.world
    z3 = r.deepspeed.zero_stage == 3
    # frozen weights at the training precision (fp32 on a CPU), partitioned at ZeRO-3
    frozen = _width(r.train.precision) / (world if z3 else 1)
    actor = fit.states(r, shape.params)
    # critic-free estimators build no critic (nor does a shared trunk: its head is hidden + 1 weights
    # on the actor), and rewards from functions alone no reward model
    critic = fit.states(r, shape.params - head) if r.ppo.separate_critic else {"gpu": 0.0, "cpu": 0.0}
    seq = r.prompts.max_length + r.generation.max_new_tokens
    ref = 0 if r.peft.enabled else frozen * shape.params  # LoRA: the adapter-disabled actor
    rm = frozen * (shape.params - head) if r.reward_dir is not None else 0
    undo_copy, undo_cpu = _undo_bytes(fit, r)
    # generation: the actor gathered whole once (ZeRO-3, unless gather_weights is off) + KV cache
    whole = 2 * shape.params if z3 and r.generation.gather_weights else 0
    gen = whole + kv_cache(shape, fit.kv_heads, r.ppo.rollout_batch_size, seq, r.train.precision)
    train_act = activations(shape, r.train.micro_batch_size, seq, True, logits=True, precision=r.train.precision)
    peak_phase = max(gen, train_act + undo_copy)  # generation and training never overlap
    fixed = actor["gpu"] + critic["gpu"] + ref + rm
    return {
        "model_states": (actor["gpu"] + critic["gpu"]) / GB,
        "frozen_models": (ref + rm) / GB,
        "generation": gen / GB,
        "activations": train_act / GB,
        "kl_rollback": undo_copy / GB,
        "cpu_per_rank": (actor["cpu"] + critic["cpu"] + undo_cpu) / GB,
        "total": (fixed + peak_phase) / GB,
    }


def estimate_recipe_dir(directory, peft: bool | None = None) -> dict:
    """Load `<dir>/{pipeline,sft,reward,ppo}.yaml` and `<dir>/architecture/config.json`; returns
    {"world": N, "params": P, "stages": {stage: {part: GB}}}. Imports torch / transformers."""
    from pathlib import Path

    from transformers import AutoConfig

    from rlhf.config import load_recipe
    from rlhf.config_rl import STAGES
    from rlhf.config_run import PipelineRecipe

    d = Path(directory)
    pipe = load_recipe(PipelineRecipe, d / "pipeline.yaml")
    world = pipe.launcher.num_gpus * pipe.launcher.num_nodes
    cfg = AutoConfig.from_pretrained(d / "architecture")
    recipes = {s: load_recipe(STAGES[s], d / f"{s}.yaml") for s in STAGES if (d / f"{s}.yaml").is_file()}
    if peft is not None:  # the same recipes with LoRA switched on or off
        from dataclasses import replace

        def switched(p):  # off: a plain section (other methods need enabled); on: the recipe's method
            return replace(p, enabled=True) if peft else replace(p, enabled=False, method="lora", quantization="none")

        recipes = {s: replace(r, peft=switched(r.peft)) for s, r in recipes.items()}
    params, stages = _estimate_for_config(cfg, world, recipes)
    return {"world": world, "params": params, "stages": stages}


def _estimate_for_config(cfg, world: int, recipes: dict) -> tuple[int, dict]:
    """(parameter count, `stage_estimates`) for a transformers config, counted exactly on the
    meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    shape = Shape(params, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.num_attention_heads)
    kv, inter, tied = cfg.num_key_value_heads, cfg.intermediate_size, bool(cfg.tie_word_embeddings)
    return params, stage_estimates(shape, kv, inter, tied, world, recipes)


def estimate_stage_output(directory) -> dict:
    """The estimate for the recipe a finished stage output was made by (its manifest), beside the
    peak its manifest measured: {"stage", "estimate_gb", "measured_gb", "measured_as", "parts"}.
    On a GPU the measure is torch's peak allocation, the quantity estimated. On a CPU it is the
    process's peak resident set, which also holds the Python runtime and libraries (0.4 GB
    here), the CPU allocator's unreturned blocks and the export, so it is expected above."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from rlhf.checkpoint import MANIFEST
    from rlhf.config_loader import from_dict
    from rlhf.config_rl import STAGES

    d = Path(directory)
    manifest = json.loads((d / MANIFEST).read_text())
    stage = manifest["stage"]
    measured = manifest.get("metrics", {}).get("peak_memory_mb")
    if stage not in STAGES or measured is None:
        raise ValueError(f"{d}: a {stage} output with no measured peak_memory_mb in its manifest")
    recipe = from_dict(STAGES[stage], manifest["recipe"])
    world = int(manifest.get("world_size", 1))
    params, stages = _estimate_for_config(AutoConfig.from_pretrained(d), world, {stage: recipe})
    est = stages[stage]
    kind = manifest["metrics"].get("peak_memory_of")  # absent in outputs made before it was recorded
    return {
        "stage": stage,
        "output": str(d),
        "params": params,
        "estimate_gb": est["total"],
        "parts": est,
        "measured_gb": measured * 2**20 / GB,
        "account": memory_account(manifest["metrics"].get("memory_marks") or {}, est),
        "measured_as": {"gpu_allocated": "peak GPU allocation", "cpu_resident_set": "peak resident set (CPU)"}.get(
            kind, "not recorded (GPU allocation on a GPU, else resident set)"
        ),
    }


# Which parts of the PPO estimate each marked phase of a run adds (rlhf.stages.common.MemoryMarks).
MARKED_PARTS = {
    "models": ("model_states", "frozen_models"),
    "generation": ("generation",),
    "training": ("activations", "kl_rollback"),
}


def memory_account(marks: dict, parts: dict) -> list[dict]:
    """The measured memory of a run's marked points, in order, each beside the estimate's parts it
    adds. `marks`: {name: {"now_mb", "peak_mb"}} (a manifest's `memory_marks`); `parts`: an estimate
    ({part: GB}). Rows: {"mark", "now_gb" (in use at the mark), "peak_rise_gb" (how much the peak
    grew since the previous mark, i.e. during that phase), "estimated_gb" (None where the estimate
    has no part for it), "parts"}."""
    rows, peak = [], 0.0
    for name, got in marks.items():
        named = MARKED_PARTS.get(name, ())
        rows.append(
            {
                "mark": name,
                "now_gb": got["now_mb"] * 2**20 / GB,
                "peak_rise_gb": max(0.0, got["peak_mb"] - peak) * 2**20 / GB,
                "estimated_gb": sum(parts.get(k, 0.0) for k in named) if named else None,
                "parts": list(named),
            }
        )
        peak = max(peak, got["peak_mb"])
    return rows
