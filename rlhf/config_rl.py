"""Recipe schemas of the RL stage (PPO and its critic-free relatives), and the registry of training stages.

Kept apart from `config.py` (the sections every stage shares, SFT and the reward model) so each
module stays small; the same loader checks them (unknown keys and wrong types name the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config import (
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    GenerationSettings,
    PeftConfig,
    RewardRecipe,
    SFTRecipe,
    TrackingConfig,
    TrainConfig,
)


@dataclass
class RLModelConfig:
    """How the RL stage loads and runs its models (which models: `sft_dir` and `reward_dir`)."""

    gradient_checkpointing: bool = False
    """Recompute the actor's and critic's activations in the backward pass: less memory, more compute."""
    attn_implementation: str | None = "auto"
    """Attention kernel (sdpa, eager, flash_attention_2, ...). 'auto': eager when the forward passes
    run in bf16 (`autocast` or `train.precision: bf16`) on a CPU and prompt plus response fit in
    256 tokens, sdpa elsewhere (`rlhf.autocast.attention_kernel`)."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directories."""
    disable_dropout: bool = True
    """Set every dropout of the four models to 0 (as TRL's PPO did). Rollout log-probs are computed
    without dropout; with it active in the update (model or LoRA dropout), the first mini-batch's
    probability ratio is not 1 and the ratio, clip fraction and approx KL measure noise."""
    autocast: Literal["none", "bf16", "auto"] = "none"
    """Run every forward pass under bf16 autocast, the weights and optimizer staying in
    `train.precision` (fp32 by default): about 1.7x faster on CPUs with avx512_bf16/AMX and on
    Ampere+ GPUs. Rollout and update use the same autocast, so the first ratio is 1 within bf16
    rounding. Without such hardware bf16 is emulated and far slower than fp32 (a SmolLM2-135M step
    went from 26 s to over 7 minutes on an AVX2-only CPU), so `auto` turns it on only where the
    device has native bf16 (`rlhf.autocast.native_bf16`) and says which it chose."""
    frozen_bf16: bool = True
    """Under autocast (ZeRO 0-2), store the frozen linear weights (LoRA bases, the reference, the
    reward model) in bf16. Autocast casts them to bf16 at every forward pass and generated token
    anyway (it caches casts only for weights that train), so they compute bit for bit the same, in
    half the memory, without the per-call cast (`rlhf.autocast.store_frozen_in_bf16`). A state saved
    so is not resumed by a run in fp32. false keeps them in fp32."""


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
    """Initialise the critic from the reward model (default) or from the SFT model with a new head
    (a separate critic only: a shared trunk's head starts at zero)."""
    critic_learning_rate: float = 1e-4
    """Learning rate of the critic (the actor's is train.learning_rate)."""
    critic_trunk: Literal["separate", "shared"] = "separate"
    """'separate': the critic is its own model (from ppo.critic_init), with its own forward and
    backward passes and optimizer. 'shared': the critic is a scalar value head on the actor's own
    last hidden states (zero-initialised, trained at critic_learning_rate), so one forward pass
    gives log-probs and values and one backward trains both: no second model to hold, score or
    update, at the price of the value loss also moving the policy's trunk (weighted by
    value_loss_coef). ppo.critic_init does not apply to it."""
    value_loss_coef: float = 0.1
    """Weight of the value loss in the actor's loss under critic_trunk=shared (a separate critic
    has its own optimizer, so its loss is not weighted)."""
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "gae"
    """How advantages are formed (`rlhf.stages.ppo.advantages.ESTIMATORS`): 'gae' is PPO with a
    critic; the others need no critic, and 'grpo', 'dr_grpo', 'rloo' and 'reinforce_pp_baseline'
    compare the ppo.rollouts_per_prompt responses to each prompt."""
    rollouts_per_prompt: int = 1
    """Responses sampled per prompt (the group size k); ppo.rollout_batch_size counts responses."""
    kl_in: Literal["auto", "reward", "loss"] = "auto"
    """Where the KL penalty (weight kl_coef) goes: folded into the reward, or a k3 term of the
    policy loss; 'auto' is the estimator's published choice (loss for GRPO / Dr. GRPO)."""
    loss_aggregation: Literal["auto", "token_mean", "sequence_mean", "constant"] = "auto"
    """How token losses are averaged (`losses.aggregate`); 'auto' is the estimator's published
    choice (sequence_mean for GRPO, constant for Dr. GRPO, token_mean otherwise)."""
    importance_ratio: Literal["token", "sequence"] = "token"
    """'sequence' is GSPO: one importance ratio per response, clipped with sequence_clip_ratio
    (critic-free estimators only)."""
    sequence_clip_ratio: float = 4e-4
    """Clip range of the sequence-level ratio (the GSPO paper used 3e-4 to 4e-4)."""
    max_minibatch_kl: float | None = 1.0
    """Guard: a mini-batch whose approx KL to the rollout policy exceeds this is not applied, and
    the rest of the step's updates are skipped (the policy has left the region its rollouts
    describe). Checked before the optimizer step; healthy updates stay below ~0.1 (null: off)."""
    kl_rollback: Literal["auto", "always", "never"] = "auto"
    """With the KL guard: take back the update that moved the policy past max_minibatch_kl, found
    on the next forward pass (or, after a step's last update, on one extra forward pass of its
    mini-batch), so the policy is always left where the guard last saw it in range. Costs one copy
    of the actor's trainable weights and optimizer state. 'auto': on except under ZeRO-3, where
    the weights are partitioned and it cannot be done (`rlhf.stages.ppo.undo`)."""

    def __post_init__(self) -> None:
        if self.rollout_batch_size < 1 or self.ppo_epochs < 1:
            raise ConfigError("ppo.rollout_batch_size and ppo.ppo_epochs must be >= 1")
        from rlhf.stages.ppo.advantages import ESTIMATORS

        est = ESTIMATORS[self.advantage_estimator]
        if self.rollouts_per_prompt < 1:
            raise ConfigError(f"ppo.rollouts_per_prompt must be >= 1, got {self.rollouts_per_prompt}")
        if self.sequence_clip_ratio <= 0 or self.clip_ratio <= 0:
            raise ConfigError("ppo.clip_ratio and ppo.sequence_clip_ratio must be > 0")
        if self.rollout_batch_size % self.rollouts_per_prompt:
            raise ConfigError(
                f"ppo.rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                f"ppo.rollouts_per_prompt ({self.rollouts_per_prompt})"
            )
        if est.needs_groups and self.rollouts_per_prompt < 2:
            raise ConfigError(
                f"ppo.advantage_estimator={self.advantage_estimator} compares responses to the same "
                "prompt: set ppo.rollouts_per_prompt >= 2 (e.g. 4 or 8)"
            )
        if self.critic_trunk == "shared" and not est.needs_critic:
            raise ConfigError(
                f"ppo.critic_trunk=shared puts a value head on the actor, but ppo.advantage_estimator="
                f"{self.advantage_estimator} uses no critic: leave critic_trunk: separate (or use gae)"
            )
        if self.value_loss_coef < 0:
            raise ConfigError(f"ppo.value_loss_coef must be >= 0, got {self.value_loss_coef}")
        if self.importance_ratio == "sequence" and not est.sequence_level:
            raise ConfigError(
                f"ppo.importance_ratio=sequence (GSPO) needs one advantage per response, but "
                f"{self.advantage_estimator} gives each token its own: use grpo, dr_grpo or rloo"
            )

    @property
    def estimator(self):
        """The chosen `advantages.Estimator`."""
        from rlhf.stages.ppo.advantages import ESTIMATORS

        return ESTIMATORS[self.advantage_estimator]

    @property
    def kl_placement(self) -> str:
        return self.estimator.kl_in if self.kl_in == "auto" else self.kl_in

    @property
    def aggregation(self) -> str:
        return self.estimator.loss_aggregation if self.loss_aggregation == "auto" else self.loss_aggregation

    @property
    def needs_critic(self) -> bool:
        return self.estimator.needs_critic

    @property
    def separate_critic(self) -> bool:
        """Whether the run holds a critic model of its own (not a value head on the actor)."""
        return self.needs_critic and self.critic_trunk == "separate"

    @property
    def shared_critic(self) -> bool:
        """Whether the critic is a value head on the actor (ppo.critic_trunk=shared with a critic)."""
        return self.needs_critic and self.critic_trunk == "shared"

    def rolls_back(self, zero_stage: int) -> bool:
        """Whether updates past max_minibatch_kl are taken back (kl_rollback resolved)."""
        from rlhf.stages.ppo import undo

        if self.max_minibatch_kl is None or self.kl_rollback == "never":
            return False
        return undo.supports(zero_stage)


@dataclass
class RewardFunction:
    """A reward written in Python: `module:function` or `path/to/file.py:function`. It is called
    as fn(prompt, response, **fields) -> float, where fields are the prompt row's other columns
    (e.g. `answer`), in a separate process (`rlhf.rewards.functions`)."""

    function: str
    """`package.module:function`, or a file path `rewards.py:function` (relative to the working directory)."""
    weight: float = 1.0
    """Weight of this source in the mixed score (each source is normalised first)."""
    normalize: bool = True
    """Normalise this source to zero mean and unit variance with a running estimate over all ranks."""
    timeout_seconds: float = 30.0
    """A call that takes longer is abandoned (its process killed) and the response dropped."""

    def __post_init__(self) -> None:
        if ":" not in self.function:
            raise ConfigError(f"reward function {self.function!r}: write it as module:function or file.py:function")
        if self.timeout_seconds <= 0:
            raise ConfigError(f"reward function {self.function!r}: timeout_seconds must be > 0")


@dataclass
class ContinueFrom:
    """Start an RL run from a finished RL run's final training state (a new round of `rlhf rounds`).

    What is carried is explicit; everything else starts fresh: the step count, the prompt stream
    (seeded by train.seed), the RNG, and the reward normaliser (the new reward model has its own
    statistics)."""

    path: str
    """The earlier RL stage's output directory (`<run>/ppo`, with its `checkpoints/`)."""
    actor: bool = True
    """The actor's weights (and its adapter under LoRA). false: the actor starts from sft_dir, e.g.
    when sft_dir is already that run's exported policy (the previous policy as the reference)."""
    critic: bool = False
    """The critic's weights. false: a fresh critic from reward_dir (ppo.critic_init), fitted to the
    new reward model rather than the one the old critic learned (under ppo.critic_trunk=shared: the
    value head back at zero on the carried actor; true keeps it)."""
    optimizer: bool = False
    """The Adam moments of the carried models (the learning-rate schedule restarts either way)."""
    kl_controller: bool = False
    """The adaptive KL coefficient as it ended (with ppo.kl_target); false: ppo.kl_coef again."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("continue_from.path: give the earlier RL run's output directory")
        if self.optimizer and not (self.actor or self.critic):
            raise ConfigError("continue_from.optimizer carries the optimizer of a carried model: set actor or critic")


@dataclass
class PPORecipe:
    """PPO: optimise the SFT policy against the reward model, with a KL leash to the SFT reference."""

    sft_dir: str
    """The SFT stage's output: actor and frozen reference start from it."""
    reward_dir: str | None
    """The reward stage's output: the frozen reward model (and the critic's initialisation); null
    when the rewards come from `reward_functions` alone."""
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
    peft: PeftConfig = field(default_factory=PeftConfig)
    """LoRA (or a mergeable relative: dora, loha, lokr, ia3) on actor and critic (the critic's scalar
    head trains in full); the reference is then the
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
    reward_functions: list[RewardFunction] = field(default_factory=list)
    """Rewards computed by Python functions, alone or mixed with the reward model."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's (normalised) score when mixed with reward_functions."""
    continue_from: ContinueFrom | None = None
    """Carry parts of a finished RL run into this one (see ContinueFrom); null: a fresh start."""

    def __post_init__(self) -> None:
        self._check_rewards()
        self._check_batching()
        self._check_rl_settings()
        self._check_continue_from()

    def _check_rewards(self) -> None:
        """A reward source, and a reward model where the critic starts from one."""
        if self.reward_dir is None and not self.reward_functions:
            raise ConfigError("no reward: set reward_dir (a reward model) and/or reward_functions")
        if self.ppo.separate_critic and self.ppo.critic_init == "reward" and self.reward_dir is None:
            raise ConfigError(
                "ppo.advantage_estimator=gae initialises its critic from the reward model, but there is "
                "no reward_dir: set ppo.critic_init=sft, or use a critic-free estimator (e.g. grpo)"
            )

    def _check_batching(self) -> None:
        """Steps, and mini-batches that divide the rollout batch one optimizer step each."""
        if self.train.max_steps < 1:
            raise ConfigError("train.max_steps must be set (>= 1) for PPO: it counts PPO steps")
        if self.train.gradient_accumulation_steps != 1:
            # The guards decide per mini-batch (skip it, or stop the step) before its optimizer step;
            # inside an accumulation window that would leave DeepSpeed's window half filled.
            raise ConfigError(
                "train.gradient_accumulation_steps must be 1 in the RL stage: a mini-batch is "
                "train.micro_batch_size rollouts and each is one optimizer step, so the guards can "
                "skip it whole. For memory, lower micro_batch_size or turn on "
                "model.gradient_checkpointing"
            )
        mini = self.train.micro_batch_size * self.train.gradient_accumulation_steps
        if self.ppo.rollout_batch_size % mini:
            raise ConfigError(
                f"ppo.rollout_batch_size ({self.ppo.rollout_batch_size}) must be a multiple of "
                f"train.micro_batch_size x train.gradient_accumulation_steps ({mini})"
            )

    def _check_rl_settings(self) -> None:
        """Settings that other stages allow but RL cannot honour (engines, sampling, adapters, rollback)."""
        if self.ppo.ptx_coef > 0 and self.ptx_data is None:
            raise ConfigError("ppo.ptx_coef > 0 needs ptx_data (SFT demonstrations)")
        if not self.deepspeed.enabled:
            raise ConfigError("the PPO stage runs its models as DeepSpeed engines; deepspeed.enabled must be true")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be >= 1")
        if self.generation.top_p < 1.0 or self.generation.top_k:
            raise ConfigError(
                "generation.top_p / generation.top_k truncate the sampling distribution, but the RL "
                "losses need log-probs of the distribution the tokens were drawn from "
                "(softmax(logits / temperature)); leave top_p: 1.0 and top_k: 0 for RL "
                "(evaluation and `rlhf generate` may use them)"
            )
        if self.peft.quant_bits is not None:
            raise ConfigError(
                "peft.method=qlora (a quantized base) is not supported in RL: the actor's base also "
                "serves as the reference and generates every rollout, in full precision; use "
                "peft.method: lora"
            )
        self.peft.require_mergeable(
            "RL", "the trained policy is exported as full weights for evaluation and the next stage"
        )
        if self.ppo.kl_rollback == "always" and self.deepspeed.zero_stage == 3:
            raise ConfigError(
                "ppo.kl_rollback=always cannot undo an update under deepspeed.zero_stage 3 (the weights "
                "are partitioned across ranks): use zero_stage 0-2, or ppo.kl_rollback: auto / never"
            )
        if self.ppo.kl_rollback == "always" and self.ppo.max_minibatch_kl is None:
            raise ConfigError("ppo.kl_rollback=always takes back updates past ppo.max_minibatch_kl, but that is null")

    def _check_continue_from(self) -> None:
        """What continue_from carries must exist in this run's layout."""
        if self.continue_from and self.continue_from.critic and not self.ppo.needs_critic:
            raise ConfigError(
                f"continue_from.critic: ppo.advantage_estimator={self.ppo.advantage_estimator} has no critic to carry"
            )
        c = self.continue_from
        if c and c.critic and self.ppo.shared_critic and not c.actor:
            raise ConfigError(
                "continue_from.critic: under ppo.critic_trunk=shared the critic is a head on the actor, so "
                "carrying it needs continue_from.actor=true (in `rlhf rounds`: carry.critic=continue needs "
                "carry.reference=sft)"
            )


STAGES: dict[str, type] = {"sft": SFTRecipe, "reward": RewardRecipe, "ppo": PPORecipe}
"""The training stages by name (what `rlhf <stage>` and the pipeline run)."""
