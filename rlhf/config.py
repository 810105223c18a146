"""Recipe schemas: one dataclass per concern, composed into one recipe per stage.

A YAML recipe is an instance of a stage recipe class below. Every field has a docstring (the
string under it) that says what it does; `config_loader` turns YAML + `key=value` overrides into
these, rejecting unknown keys and wrong types. Cross-field checks live in `__post_init__` so
that a recipe built in Python is checked the same way as one loaded from YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config_loader import ConfigError, dump_yaml, load_recipe, to_dict

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """Which model and tokenizer a stage starts from, and how to load them."""

    name_or_path: str = ""
    """Local HuggingFace directory of the starting model (the base model for SFT)."""
    tokenizer: str | None = None
    """Tokenizer directory when it differs from `name_or_path`."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    attn_implementation: str | None = "auto"
    """Attention kernel (sdpa, eager, flash_attention_2, ...). 'auto': eager when the forward passes
    run in bf16 (`autocast` or `train.precision: bf16`) on a CPU with rows of at most 256 tokens
    (`data.max_length`), where it is about 10% faster per training step than sdpa; sdpa elsewhere
    (`rlhf.autocast.attention_kernel`, measured by scripts/bench_attention.py)."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory."""
    autocast: Literal["none", "bf16", "auto"] = "none"
    """Run the model's forward passes (training and evaluation) under bf16 autocast, the weights
    and optimizer staying in `train.precision`; a scalar head stays fp32. About 1.6x faster forward
    passes on CPUs with avx512_bf16/AMX and on Ampere+ GPUs; `auto` turns it on only there, since
    emulated bf16 is far slower than fp32 (see `rlhf.autocast`). The PPO family's `model.autocast`
    decides the same way, but there every forward, the reward model's and the critic's heads
    included, runs under autocast."""

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path is required (a local HuggingFace model directory or a hub id)")


@dataclass
class DataSource:
    """One data file or directory in a (possibly weighted) mixture."""

    path: str = ""
    """A .jsonl / .json / .csv / .parquet file, a `datasets.save_to_disk` directory, or a Hugging
    Face Hub dataset id (`owner/name`, read through the HF cache; see `rlhf.hub`)."""
    weight: float = 1.0
    """Relative share of this source in the mixed training set (weights need not sum to 1)."""
    split: str = "train"
    """Which split to read from a saved DatasetDict directory or a hub dataset (e.g. train_prefs)."""
    config: str | None = None
    """Configuration (subset) name of a hub dataset that has several."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("data source needs a 'path'")
        if self.weight <= 0:
            raise ConfigError(f"data source {self.path!r}: weight must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    """Where the examples come from and how they are cleaned and split."""

    sources: list[DataSource] = field(default_factory=list)
    """One or more sources; with several, `weight` sets each one's share of the training set."""
    validation_fraction: float = 0.05
    """Share of each source held out for validation (split before mixing, so never upsampled)."""
    test_fraction: float = 0.0
    """Share of each source held out as a test split, never trained or early-stopped on."""
    split_seed: int = 0
    """Seed of the deterministic shuffle behind the splits and the mixture."""
    max_length: int = 512
    """Examples longer than this many tokens are dropped and counted (never silently truncated)."""
    deduplicate: bool = True
    """Drop exact duplicate examples (counted in the log and manifest)."""
    bad_rows: Literal["drop", "error"] = "drop"
    """A malformed row is dropped and counted ('drop') or stops the run before training ('error')."""
    too_long: Literal["drop", "error"] = "drop"
    """A row over `max_length` tokens is dropped and counted, or stops the run naming file and row."""
    mixture_size: int | None = None
    """Rows in the mixed training set; default: the sum of the sources' training rows."""
    max_samples: int | None = None
    """Cap on the training rows after mixing (handy for smoke tests)."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources needs at least one source")
        for name in ("validation_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"data.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ConfigError("data.validation_fraction + data.test_fraction must leave rows to train on")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be at least 8 tokens, got {self.max_length}")


@dataclass
class TrainConfig:
    """Optimisation: how long, how fast, how batched."""

    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming the learning rate up from zero."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    num_epochs: float = 1.0
    """Passes over the training set (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means `num_epochs` decides."""
    micro_batch_size: int = 8
    """Examples per process per forward/backward pass."""
    gradient_accumulation_steps: int = 1
    """Micro batches per optimizer step; global batch = micro * accumulation * processes."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (0 disables clipping)."""
    precision: Precision = "fp32"
    """fp32 everywhere on CPU; bf16 on Ampere+ GPUs; fp16 with loss scaling on older GPUs."""
    seed: int = 42
    """Seed for model init of new heads, dropout and data order."""
    logging_steps: int = 10
    """Log training metrics every this many steps."""
    eval_steps: int = 50
    """Evaluate on the validation split every this many steps (0 disables evaluation)."""
    save_steps: int = 50
    """Save a resumable checkpoint every this many steps."""
    save_total_limit: int = 2
    """Keep only the newest this many checkpoints (the best is always kept with early stopping)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement of the validation metric (0: off)."""
    load_best_at_end: bool = False
    """Export the checkpoint with the best validation metric instead of the last (always on with
    early stopping)."""

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        for name in ("micro_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"train.max_steps must be -1 (use num_epochs) or >= 1, got {self.max_steps}")
        if self.max_steps == -1 and self.num_epochs <= 0:
            raise ConfigError(f"train.num_epochs must be > 0, got {self.num_epochs}")
        if self.early_stopping_patience and not self.eval_steps:
            raise ConfigError("train.early_stopping_patience needs train.eval_steps > 0")
        if (
            (self.early_stopping_patience or self.load_best_at_end)
            and self.eval_steps
            and self.save_steps % self.eval_steps
        ):
            raise ConfigError(
                f"train.save_steps ({self.save_steps}) must be a multiple of train.eval_steps "
                f"({self.eval_steps}) to keep the best checkpoint, so that every evaluation has one"
            )

    @property
    def keep_best(self) -> bool:
        return bool(self.eval_steps) and (self.load_best_at_end or self.early_stopping_patience > 0)


@dataclass
class DeepSpeedConfig:
    """What DeepSpeed does with the trainable model(s); see `rlhf.distributed.build_deepspeed_config`."""

    enabled: bool = True
    """Run under a DeepSpeed engine; false trains with plain PyTorch (DDP when launched on several ranks)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, 3 + parameters sharded across ranks."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) on CPU memory; ZeRO 1-3."""
    offload_params: bool = False
    """Keep parameters on CPU memory between uses; ZeRO-3 only."""
    config_file: str | None = None
    """Your own DeepSpeed JSON; its values win over the ones built from this recipe."""

    def __post_init__(self) -> None:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage: 3")


PeftMethod = Literal["lora", "dora", "qlora", "loha", "lokr", "ia3", "prompt_tuning", "prefix_tuning"]
"""The parameter-efficient methods a recipe can name (`rlhf.adapters` maps each to peft)."""


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning with peft: LoRA and its relatives, or prompt / prefix tuning."""

    enabled: bool = False
    """Train a small set of added parameters (the method below) instead of all weights."""
    method: PeftMethod = "lora"
    """lora; dora (LoRA with a learned magnitude, Liu et al. 2024); qlora (LoRA on a 4-bit base,
    Dettmers et al. 2023); loha / lokr (Hadamard / Kronecker products of low-rank factors, LyCORIS);
    ia3 (learned scaling vectors, Liu et al. 2022); prompt_tuning (learned input embeddings, Lester
    et al. 2021); prefix_tuning (learned keys and values in every layer, Li & Liang 2021). The last
    two cannot be merged into the weights: their outputs stay adapters, which SFT, evaluation,
    `rlhf generate` and `rlhf chat` accept and the stages that need full weights refuse."""
    r: int = 16
    """Rank of the adapters (lora, dora, qlora, loha, lokr)."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r (lora, dora, qlora, loha, lokr)."""
    dropout: float = 0.05
    """Dropout on the adapter input (lora, dora, qlora); module dropout for loha / lokr."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or 'all-linear'. For ia3 'all-linear' means peft's per-architecture
    choice from the IA3 paper (keys, values and the feed-forward layer's input)."""
    feedforward_modules: list[str] | None = None
    """ia3 only, with explicit target_modules: which of them scale their input (feed-forward layers)
    rather than their output."""
    num_virtual_tokens: int = 20
    """prompt_tuning / prefix_tuning: how many learned positions are put before every input."""
    prompt_init_text: str | None = None
    """prompt_tuning: start the learned embeddings from this text's tokens (Lester et al. found this
    trains faster than random); None starts from randomly sampled vocabulary embeddings."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """How the frozen base is loaded for qlora: 'none' means the QLoRA default, 4-bit NF4 with
    double quantization; '8bit' is LLM.int8(). Needs bitsandbytes (`pip install -e '.[qlora]'`).
    With method lora, a value other than 'none' is the older spelling of method qlora."""
    merge_on_export: bool = True
    """Write a merged standalone model; false writes the adapter with its base recorded. Methods
    that cannot merge (prompt_tuning, prefix_tuning) always write the adapter."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"peft.r must be >= 1, got {self.r}")
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.method != "lora" and not self.enabled:
            raise ConfigError(f"peft.method={self.method} needs peft.enabled: true (it trains adapters)")
        if self.quantization != "none" and not self.enabled:
            raise ConfigError("peft.quantization needs peft.enabled: true (QLoRA trains adapters)")
        if self.quantization != "none" and self.method not in ("lora", "qlora"):
            raise ConfigError(f"peft.quantization is for method qlora (LoRA on a quantized base), not {self.method}")
        if self.prompt_init_text is not None and self.method != "prompt_tuning":
            raise ConfigError("peft.prompt_init_text is used by method prompt_tuning only")
        if self.feedforward_modules is not None and (self.method != "ia3" or self.target_modules == "all-linear"):
            raise ConfigError(
                "peft.feedforward_modules is used by method ia3 with explicit peft.target_modules only "
                "(with 'all-linear', peft chooses the feed-forward layers)"
            )
        targets = self.target_modules
        if self.feedforward_modules and isinstance(targets, list) and not set(self.feedforward_modules) <= set(targets):
            raise ConfigError("peft.feedforward_modules must be a subset of peft.target_modules")

    @property
    def quant_bits(self) -> Literal["4bit", "8bit"] | None:
        """The base model's load precision under QLoRA, or None for an unquantized base."""
        if not self.enabled:
            return None
        if self.method == "qlora":
            return "4bit" if self.quantization == "none" else self.quantization
        return None if self.quantization == "none" else self.quantization

    @property
    def kind(self) -> str:
        """The method as trained: the older spelling (lora + quantization) is qlora."""
        return "qlora" if self.quant_bits is not None else self.method

    @property
    def mergeable(self) -> bool:
        """Whether the trained adapter folds into the base weights (prompt and prefix tuning do not)."""
        return self.method not in ("prompt_tuning", "prefix_tuning")

    def require_mergeable(self, stage: str, why: str) -> None:
        """Refuse a non-mergeable method in a stage that needs full weights, saying why."""
        if self.enabled and not self.mergeable:
            raise ConfigError(
                f"peft.method={self.method} is not supported by the {stage} stage: {why}. Use one of "
                "lora, dora, loha, lokr or ia3 (mergeable adapters), or full fine-tuning"
            )


@dataclass
class TrackingConfig:
    """Experiment tracking: wandb (offline unless an API key is set) plus a local JSONL log."""

    wandb: bool = True
    """Log to wandb; the JSONL log in the output directory is always written."""
    wandb_mode: Literal["auto", "offline", "online", "disabled"] = "auto"
    """'auto' is online when WANDB_API_KEY is set, else offline (sync later with `wandb sync`)."""
    project: str = "rlhf"
    """wandb project."""
    group: str | None = None
    """wandb group; default: the output directory's name, so all stages of one run group together."""
    run_name: str | None = None
    """wandb run name; default: '<group>-<stage>'."""


@dataclass
class SFTRecipe:
    """Supervised fine-tuning on demonstrations (prompt/completion or chat messages)."""

    model: ModelConfig
    """The base model to fine-tune."""
    data: DataConfig
    """Demonstrations."""
    output_dir: str = "runs/demo"
    """Run directory; this stage writes `<output_dir>/sft/`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Parameter-efficient fine-tuning (LoRA, QLoRA, DoRA, LoHa, LoKr, IA3, prompt or prefix tuning); off by default."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """wandb and the local metrics log."""
    packing: bool = False
    """Pack several examples into each row of `data.max_length` tokens (no cross-attention between them)."""
    loss_on: Literal["completion", "all"] = "completion"
    """Train on the assistant / completion tokens only, or on every token."""
    resume: str = "auto"
    """'auto' continues from the newest checkpoint in the output directory, 'never' starts over,
    or a path to a specific checkpoint."""
    demo_assets: str | None = None
    """If set, build the demo tokenizer, base model and task data into this directory first
    (deterministic, skipped when already built). Only the demo recipes set it."""

    def __post_init__(self) -> None:
        if self.packing and self.peft.enabled and not self.peft.mergeable:
            raise ConfigError(
                f"packing: true cannot be used with peft.method={self.peft.method}: packed examples are "
                "kept apart by their position ids, which peft drops (prompt tuning) or the model ignores "
                "behind a prefix cache (prefix tuning), so they would attend to each other; set packing: false"
            )


@dataclass
class RewardRecipe:
    """Reward model: a scalar head on the SFT model, trained on preference pairs (Bradley-Terry)."""

    model: ModelConfig
    """`name_or_path` is the SFT stage's output directory (it must have its rlhf manifest)."""
    data: DataConfig
    """Preference pairs: prompt / chosen / rejected (strings or messages), optional margin and tie."""
    output_dir: str = "runs/demo"
    """Run directory; this stage writes `<output_dir>/reward/`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Parameter-efficient fine-tuning (mergeable methods); the scalar head is always trained in full and saved."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """wandb and the local metrics log."""
    ties: Literal["drop", "soft"] = "drop"
    """Pairs marked as ties: dropped and counted, or trained towards equal rewards (each tie enters
    training in both orders, which is the Bradley-Terry loss with target 1/2). Never validated on."""
    use_margin: bool = True
    """Use the rows' `margin` column in the loss, -log sigmoid(r_chosen - r_rejected - margin)."""
    center_rewards_coefficient: float | None = None
    """Penalty on the mean reward squared, keeping rewards centred on zero (Eisenstein et al. 2023)."""
    best_metric: Literal["accuracy", "loss"] = "accuracy"
    """Validation metric for early stopping and for keeping the best checkpoint."""
    calibration_bins: int = 5
    """Bins of predicted confidence in the calibration table."""
    stats_max_samples: int = 4096
    """Chosen responses of the training split scored for the reward mean/std used by PPO."""
    labelled: DataSource | None = None
    """Optional single responses with a 0/1 `label` (bad/good): precision and recall are reported."""
    resume: str = "auto"
    """'auto', 'never' or a checkpoint path, as in SFT."""
    demo_assets: str | None = None
    """Build the demo assets into this directory first (demo recipes only)."""

    def __post_init__(self) -> None:
        if self.calibration_bins < 1:
            raise ConfigError(f"calibration_bins must be >= 1, got {self.calibration_bins}")
        self.peft.require_mergeable(
            "reward",
            "its head reads the score at the last real token, which prompt learning hides (peft feeds the "
            "model embeddings, not token ids), and RL loads the reward model as full weights",
        )


@dataclass
class GenerationSettings:
    """Sampling of responses (RL rollouts, evaluation, generate, labelling candidates)."""

    max_new_tokens: int = 32
    """Response length limit; a response that hits it without eos gets `ppo.missing_eos_penalty`."""
    temperature: float = 1.0
    """Sampling temperature; log-probabilities are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0: off)."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    gather_weights: bool = True
    """ZeRO-3: materialise the whole actor once per rollout batch (fast generation). False gathers
    layer by layer for every token: slow, but the model never sits whole on one GPU (70B scale)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("generation: need max_new_tokens >= 1, temperature > 0 and 0 < top_p <= 1")


__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataSource",
    "DataConfig",
    "TrainConfig",
    "DeepSpeedConfig",
    "PeftConfig",
    "TrackingConfig",
    "SFTRecipe",
    "RewardRecipe",
    "GenerationSettings",
    "load_recipe",
    "to_dict",
    "dump_yaml",
]
