"""Recipe schemas for what runs around the training stages: evaluation and the whole pipeline.

Kept apart from `config.py` (the training stages) to keep each module small; the same loader
checks them (unknown keys and wrong types are errors naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config import ConfigError, DataConfig, DataSource, GenerationSettings, TrackingConfig
from rlhf.config_dpo import DPORecipe
from rlhf.config_rl import STAGES


@dataclass
class PolicySpec:
    """One more policy to evaluate beside base / SFT / PPO."""

    name: str = ""
    """Row label in the report."""
    path: str = ""
    """Local HF directory of the policy."""
    few_shot: int = 0
    """Demonstrations from `few_shot_data` put before each prompt (for base models)."""

    def __post_init__(self) -> None:
        if not self.name or not self.path:
            raise ConfigError("extra_policies entries need a 'name' and a 'path'")


@dataclass
class EvalRecipe:
    """Compare policies on held-out prompts: reward, win rate, KL, length, diversity, reward hacking."""

    sft_dir: str
    """SFT output: the KL reference and the baseline of every win rate."""
    reward_dir: str | None
    """Reward model that scores each response and judges win rates (null: none; then the task's
    ground truth is the measure, as for RL on verifiable rewards)."""
    prompts: DataConfig
    """Held-out prompts (rows with `prompt` or `messages`); every row is used (no split)."""
    ppo_dir: str | None = None
    """PPO output to evaluate (its metrics.jsonl also gives the reward / KL curves)."""
    base_dir: str | None = None
    """Base model before SFT, evaluated with `base_few_shot` demonstrations as a baseline."""
    base_few_shot: int = 2
    """Demonstrations before each prompt for the base model."""
    few_shot_data: DataSource | None = None
    """Demonstrations (prompt/completion or messages) for few-shot prompts."""
    extra_policies: list[PolicySpec] = field(default_factory=list)
    """Any other policies to put in the table."""
    rl_variants: list[PolicySpec] = field(default_factory=list)
    """Other methods' outputs compared like the PPO row: RL runs (GRPO, RLOO, ...) and DPO-stage
    runs (DPO, IPO, KTO, ...); the pipeline fills this from its `rl_variants` and `dpo_variants`.
    Their training time and peak memory come from their manifests."""
    heldout_reward_dir: str | None = None
    """A second reward model that PPO never optimised against: a drop under it while the training
    reward rises is the signature of reward hacking."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt and policy."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Sampling settings; the same for every policy."""
    greedy: bool = False
    """Decode greedily instead: one answer per prompt and policy (`samples_per_prompt` and the
    temperature are not used), the usual reading of accuracy on checked-answer tasks. Greedy answers
    are not samples of the policy, so `kl_to_sft` is not estimated (nan)."""
    batch_size: int = 64
    """Sequences per forward pass when sampling and scoring."""
    generation_autocast: Literal["none", "bf16", "auto"] = "none"
    """Sample every policy's answers under bf16 autocast (`auto`: where the hardware has native
    bf16, see `rlhf.autocast`): about 1.6x faster sampling there. Scoring, the KL estimate and the
    forgetting measure still compute in the models' own precision; the answers they measure are
    other samples, though, so the numbers differ as another seed's would."""
    ground_truth: Literal["none", "demo", "demo_no_repeats", "instruct", "arithmetic", "reverse", "pick"] = "none"
    """Also grade responses with a task's ground-truth scorer (0-100, `rlhf.tasks.GRADERS`):
    'demo' for the demo task ('demo_no_repeats': the rounds demo's, see docs/rounds.md), 'instruct'
    for the instruction-following task, 'arithmetic' for checked answers, 'reverse' and 'pick' for
    the exact-answer tasks of `rlhf tasks build` (exact match)."""
    best_of_n: int = 0
    """Add a best-of-n row: n SFT samples per answer, the reward model picks one (0: no row). A
    policy that RL trained should beat it; its KL to SFT is the analytic log(n) - (n-1)/n."""
    forgetting_prompts: DataSource | None = None
    """General questions unrelated to the task. The base model answers them greedily once, and
    each policy's per-token NLL of those answers measures what fine-tuning forgot (needs base_dir)."""
    forgetting_max_new_tokens: int = 48
    """Length of the base model's answers for the forgetting measure."""
    forgetting_limit: float = 0.05
    """The report flags every policy whose perplexity on those answers rose more than this
    (relative, 0.05 = 5%) over the base model's."""
    side_by_side: int = 5
    """Prompts shown with every policy's answer in the report."""
    seed: int = 0
    """Sampling seed (the same for every policy)."""
    output_dir: str = "runs/demo"
    """Run directory; the report goes to `<output_dir>/eval/`."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """wandb (report table, plots) and nothing else: the report files are always written."""
    demo_assets: str | None = None
    """Build the demo assets into this directory first (demo recipes only)."""

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 1 or self.batch_size < 1:
            raise ConfigError("samples_per_prompt and batch_size must be >= 1")
        if self.greedy:
            self.samples_per_prompt = 1  # every greedy answer to a prompt is the same one
        if self.forgetting_limit < 0:
            raise ConfigError(f"forgetting_limit is a relative rise (0.05 = 5%), >= 0; got {self.forgetting_limit}")
        if self.base_dir and self.base_few_shot and self.few_shot_data is None:
            raise ConfigError("base_few_shot > 0 needs few_shot_data (demonstrations to show the base model)")
        if any(p.few_shot for p in self.extra_policies) and self.few_shot_data is None:
            raise ConfigError("extra_policies with few_shot > 0 need few_shot_data")
        if self.forgetting_prompts is not None and not self.base_dir:
            raise ConfigError(
                "forgetting_prompts needs base_dir (the model whose answers the policies are measured on)"
            )
        if self.best_of_n == 1 or self.best_of_n < 0:
            raise ConfigError(f"best_of_n must be 0 (off) or >= 2, got {self.best_of_n}")
        if self.best_of_n and self.greedy:
            raise ConfigError("best_of_n needs sampled answers; it cannot be combined with greedy: true")
        if self.best_of_n and not self.reward_dir:
            raise ConfigError("best_of_n needs reward_dir: the reward model picks the best of n samples")


@dataclass
class LauncherConfig:
    """How the pipeline launches each training stage: the `deepspeed` launcher's arguments."""

    num_gpus: int = 1
    """Processes per node (GPUs; on a CPU machine, processes on gloo)."""
    num_nodes: int = 1
    """Nodes to use from the hostfile."""
    hostfile: str | None = None
    """DeepSpeed hostfile ('host slots=N' per line) for multi-node runs."""
    master_addr: str | None = None
    """Address of the first node (multi-node)."""
    master_port: int | None = None
    """Rendezvous port; default: a free one per stage."""

    def __post_init__(self) -> None:
        if self.num_gpus < 1 or self.num_nodes < 1:
            raise ConfigError("launcher.num_gpus and launcher.num_nodes must be >= 1")


@dataclass
class RLVariant:
    """One more run of a method stage (PPO or DPO) beside the pipeline's own, from the same SFT
    (and reward) outputs, with some recipe values changed."""

    name: str
    """Row label in the report, and the run's directory: `<output_dir>/variants/<name>/<stage>`."""
    overrides: list[str] = field(default_factory=list)
    """`key=value` overrides of the stage's recipe, e.g. ppo.advantage_estimator=grpo, or loss_type=ipo."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"variant name {self.name!r} must be letters, digits, - or _")


@dataclass
class StageOverrides:
    """Extra `key=value` overrides per stage, applied after the pipeline's own wiring."""

    sft: list[str] = field(default_factory=list)
    reward: list[str] = field(default_factory=list)
    ppo: list[str] = field(default_factory=list)
    dpo: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)


PIPELINE_STAGES = ("sft", "reward", "ppo", "dpo", "eval")


@dataclass
class PipelineRecipe:
    """SFT -> reward -> PPO (and/or DPO) -> evaluation, each stage consuming the previous stages' directories."""

    sft: str
    """Path of the SFT recipe."""
    reward: str | None = None
    """Path of the reward recipe (its model is wired to `<output_dir>/sft`; null: no reward model)."""
    ppo: str | None = None
    """Path of the PPO recipe (wired to `<output_dir>/sft` and `<output_dir>/reward`; null: no RL)."""
    dpo: str | None = None
    """Path of a DPO-stage recipe (DPO, IPO, robust DPO, KTO; wired to `<output_dir>/sft`), run
    beside PPO or instead of it; null: none. The method is chosen in that recipe (`method`, `loss_type`)."""
    eval: str | None = None
    """Path of the evaluation recipe (null: no evaluation)."""
    output_dir: str = "runs/demo"
    """Run directory shared by every stage: `<output_dir>/{sft,reward,ppo,dpo,eval}/`."""
    overrides: StageOverrides = field(default_factory=StageOverrides)
    """Per-stage recipe overrides."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """Processes, nodes and hostfile for the training stages."""
    group: str | None = None
    """wandb group of all stages; default: the output directory's name."""
    stages: list[str] = field(default_factory=lambda: list(PIPELINE_STAGES))
    """Stages to run, in pipeline order (a stage whose output is complete is skipped anyway).
    Stages without a recipe path are left out."""
    rl_variants: list[RLVariant] = field(default_factory=list)
    """More RL runs after the PPO stage (other estimators, settings), each evaluated beside PPO
    (left out when the ppo stage is not run)."""
    dpo_variants: list[RLVariant] = field(default_factory=list)
    """More DPO-stage runs after the DPO stage (other losses, KTO), each evaluated beside the rest
    (left out when the dpo stage is not run)."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in PIPELINE_STAGES]
        if unknown:
            raise ConfigError(f"stages: unknown stage(s) {unknown}; choose from {list(PIPELINE_STAGES)}")
        self.stages = [s for s in self.stages if getattr(self, s) is not None]
        if "ppo" in self.stages and self.reward is None:
            raise ConfigError("the ppo stage needs a reward recipe (reward: path) to train its reward model")
        names = [v.name for v in self.rl_variants + self.dpo_variants]
        if len(set(names)) != len(names) or {"ppo", "dpo"} & set(names):
            raise ConfigError(f"rl_variants and dpo_variants: names must be unique and not 'ppo' or 'dpo', got {names}")


RECIPES: dict[str, type] = {**STAGES, "dpo": DPORecipe, "eval": EvalRecipe, "pipeline": PipelineRecipe}
