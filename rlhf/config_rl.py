"""Recipe schemas of the RL stage (PPO and its critic-free relatives), and the registry of training stages.

Kept apart from `config.py` (the sections every stage shares, SFT and the reward model) so each
module stays small; the same loader checks them (unknown keys and wrong types name the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config import (ConfigError, DataConfig, DeepSpeedConfig, GenerationSettings, LoraConfig, RewardRecipe,
                         SFTRecipe, TrackingConfig, TrainConfig)


@dataclass
class RLModelConfig:
    """How the RL stage loads and runs its models (which models: `sft_dir` and `reward_dir`)."""

    gradient_checkpointing: bool = False
    """Recompute the actor's and critic's activations in the backward pass: less memory, more compute."""
    attn_implementation: str | None = "sdpa"
    """Attention kernel passed to `from_pretrained` (sdpa, eager, flash_attention_2, ...)."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directories."""
    disable_dropout: bool = True
    """Set every dropout of the four models to 0 (as TRL's PPO did). Rollout log-probs are computed
    without dropout; with it active in the update (model or LoRA dropout), the first mini-batch's
    probability ratio is not 1 and the ratio, clip fraction and approx KL measure noise."""
    autocast: Literal["none", "bf16"] = "none"
    """Run every forward pass under bf16 autocast, the weights and optimizer staying in
    `train.precision` (fp32 by default): about 1.7x faster on CPUs with avx512_bf16/AMX and on
    Ampere+ GPUs. Rollout and update use the same autocast, so the first ratio is 1 within bf16
    rounding."""


@dataclass
class PPOSettings:
    """The PPO algorithm (Schulman et al. 2017) as used for RLHF (Ouyang et al. 2022)."""

    rollout_batch_size: int = 32
    """Prompts per process per PPO step; a multiple of train.micro_batch_size."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    gamma: float = 1.0
    """Discount of future rewards within a response."""
    lam: float = 0.95
    """GAE lambda: bias/variance trade-off of the advantages."""
    clip_ratio: float = 0.2
    """Policy ratio clip range (epsilon)."""
    value_clip: float | None = 0.2
    """Clip range of value updates around the rollout values (null: unclipped)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight in the policy loss."""
    kl_coef: float = 0.05
    """Initial weight of the per-token KL penalty to the reference (SFT) policy."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward: k1 = log p/q, k3 = (q/p - 1) - log q/p."""
    kl_target: float | None = None
    """Adaptive KL: steer the coefficient towards this KL per sequence (null: fixed coefficient)."""
    kl_horizon: int = 10000
    """Adaptive KL horizon in rollouts."""
    reward_normalization: Literal["manifest", "running", "none"] = "manifest"
    """Normalise scores with the reward manifest's mean/std, a running estimate, or not at all."""
    reward_clip: float = 5.0
    """Clip normalised scores to [-reward_clip, reward_clip]."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of a response that never emits eos (null: no penalty)."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean and unit variance over the global rollout batch (all ranks)."""
    target_approx_kl: float | None = None
    """Stop the PPO epochs of a step early when the mean approx KL of an epoch exceeds this."""
    ratio_threshold: float = 10.0
    """Skip a mini-batch whose mean probability ratio exceeds this (a sign of a broken update)."""
    max_bad_steps: int = 3
    """Abort after this many consecutive steps with NaN/inf in rewards, log-probs or losses."""
    ptx_coef: float = 0.0
    """Weight of the SFT loss on SFT data mixed into the policy loss (PPO-ptx, against forgetting)."""
    critic_init: Literal["reward", "sft"] = "reward"
    """Initialise the critic from the reward model (default) or from the SFT model with a new head."""
    critic_learning_rate: float = 1e-4
    """Learning rate of the critic (the actor's is train.learning_rate)."""

    def __post_init__(self) -> None:
        if self.rollout_batch_size < 1 or self.ppo_epochs < 1:
            raise ConfigError("ppo.rollout_batch_size and ppo.ppo_epochs must be >= 1")


@dataclass
class PPORecipe:
    """PPO: optimise the SFT policy against the reward model, with a KL leash to the SFT reference."""

    sft_dir: str
    """The SFT stage's output: actor and frozen reference start from it."""
    reward_dir: str
    """The reward stage's output: the frozen reward model (and the critic's initialisation)."""
    prompts: DataConfig
    """Prompts to sample rollouts from: rows with `prompt` (string or messages) or `messages`."""
    model: RLModelConfig = field(default_factory=RLModelConfig)
    """How the models are loaded and run (attention kernel, dropout, autocast, checkpointing)."""
    ptx_data: DataConfig | None = None
    """SFT demonstrations for the PPO-ptx loss (needed when ppo.ptx_coef > 0)."""
    output_dir: str = "runs/demo"
    """Run directory; this stage writes `<output_dir>/ppo/`."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, learning_rate=1e-5))
    """Actor optimisation; max_steps counts PPO steps; micro batch x accumulation is one mini-batch."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Engines for actor and critic (reference and reward model share the ZeRO stage, inference only)."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Rollout sampling."""
    peft: LoraConfig = field(default_factory=LoraConfig)
    """LoRA on actor and critic (the critic's scalar head trains in full); the reference is then the
    actor with its adapter disabled, so no second copy of the policy is held."""
    ppo: PPOSettings = field(default_factory=PPOSettings)
    """The algorithm."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """wandb and the local metrics log."""
    sample_every: int = 10
    """Log a table of sample prompts, responses and rewards every this many steps (0: never)."""
    keep_checkpoints: int = 2
    """Full training states kept (the newest ones); each is written atomically."""
    resume: Literal["auto", "never"] = "auto"
    """'auto' continues from the newest complete state in the output directory."""
    demo_assets: str | None = None
    """Build the demo assets into this directory first (demo recipes only)."""

    def __post_init__(self) -> None:
        if self.train.max_steps < 1:
            raise ConfigError("train.max_steps must be set (>= 1) for PPO: it counts PPO steps")
        mini = self.train.micro_batch_size * self.train.gradient_accumulation_steps
        if self.ppo.rollout_batch_size % mini:
            raise ConfigError(f"ppo.rollout_batch_size ({self.ppo.rollout_batch_size}) must be a multiple of "
                              f"train.micro_batch_size x train.gradient_accumulation_steps ({mini})")
        if self.ppo.ptx_coef > 0 and self.ptx_data is None:
            raise ConfigError("ppo.ptx_coef > 0 needs ptx_data (SFT demonstrations)")
        if not self.deepspeed.enabled:
            raise ConfigError("the PPO stage runs its models as DeepSpeed engines; deepspeed.enabled must be true")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be >= 1")
        if self.generation.top_p < 1.0 or self.generation.top_k:
            raise ConfigError("generation.top_p / generation.top_k truncate the sampling distribution, but the RL "
                              "losses need log-probs of the distribution the tokens were drawn from "
                              "(softmax(logits / temperature)); leave top_p: 1.0 and top_k: 0 for RL "
                              "(evaluation and `rlhf generate` may use them)")
        if self.peft.quantization != "none":
            raise ConfigError("peft.quantization (QLoRA) is not supported in PPO: actor and critic train in "
                              "precision, use peft.enabled with quantization: none")


STAGES: dict[str, type] = {"sft": SFTRecipe, "reward": RewardRecipe, "ppo": PPORecipe}
"""The training stages by name (what `rlhf <stage>` and the pipeline run)."""
