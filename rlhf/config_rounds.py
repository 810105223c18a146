"""Recipe schema of `rlhf rounds`: iterative RLHF, rounds of sample -> label -> reward update -> RL.

Kept apart from the stage recipes: a rounds recipe points at ordinary reward, RL and evaluation
recipes and says only what is particular to the loop (how many pairs a round labels, who labels
them, and what carries from one round to the next).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config import ConfigError, DataSource, GenerationSettings
from rlhf.config_run import LauncherConfig


@dataclass
class Carry:
    """What one round hands to the next. The defaults follow what Llama 2 and Anthropic's online
    RLHF report doing; docs/rounds.md gives the sources and the reasoning."""

    reference: Literal["sft", "previous"] = "sft"
    """The KL reference of round k's RL: the SFT model (Llama 2: the penalty is to the original
    policy, every round), or round k-1's policy (a trust region that moves with the policy)."""
    critic: Literal["reinit", "continue"] = "reinit"
    """'reinit': a fresh critic from the updated reward model (the old critic predicted the old
    reward model's returns); 'continue': round k-1's critic."""
    reward_model: Literal["continue_all", "continue_new", "retrain_all"] = "continue_all"
    """'continue_all': round k-1's reward model trained further on all preferences so far (the
    initial data and every round's labels); 'continue_new': on round k's labels only (cheaper,
    but it may forget the initial data); 'retrain_all': a fresh head on the SFT model, on all."""
    kl_controller: Literal["reset", "continue"] = "reset"
    """The adaptive KL coefficient (with ppo.kl_target): back to ppo.kl_coef, or as it ended."""
    optimizer: Literal["reset", "continue"] = "reset"
    """Adam moments of the carried actor (and critic): fresh, or continued."""

    def __post_init__(self) -> None:
        if self.critic == "continue" and self.reference == "previous":
            raise ConfigError(
                "carry.critic=continue with carry.reference=previous: the next round starts from the previous "
                "policy's exported weights (a fresh adapter), so there is no matching training state to continue "
                "the critic from; use carry.critic=reinit or carry.reference=sft"
            )
        if self.optimizer == "continue" and self.reference == "previous":
            raise ConfigError(
                "carry.optimizer=continue needs carry.reference=sft (the actor continues its own training "
                "state only on the same reference)"
            )


@dataclass
class ScriptedAnnotator:
    """Stand-ins for people, for demos and tests. Each signs in with its own access token and labels
    through the labelling app's HTTP API (`/api/next`, `/api/labels`), as a person's browser does;
    it never writes to the database. It prefers the answer the task's ground-truth grader scores
    higher, and is wrong `noise` of the time."""

    task: Literal["demo", "demo_no_repeats", "instruct", "arithmetic"]
    """Whose ground truth it judges by (`rlhf.tasks.GRADERS`)."""
    annotators: int = 1
    """How many scripted people label side by side (names scripted-1, scripted-2, ...)."""
    noise: float = 0.1
    """Share of judgements flipped, as people disagree with the truth."""
    tie_below: float = 0.0
    """A score difference at or below this is a tie (unless `tie_break` separates the two)."""
    tie_break: bool = True
    """When the scores tie, prefer by the task's partial credit where it has one
    (`rlhf.tasks.PARTIAL_CREDIT`; strength 1), as a person would who sees that one answer follows
    more of the instructions although both are off topic. A tie then means the two are equal by
    every part of the ground truth."""
    delay_seconds: float = 0.0
    """Pause after each label (slows the stand-in down, e.g. to interrupt a round that waits)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.annotators < 1:
            raise ConfigError(f"annotator.annotators must be >= 1, got {self.annotators}")
        if not 0 <= self.noise <= 0.5:
            raise ConfigError(f"annotator.noise must be within [0, 0.5], got {self.noise}")


@dataclass
class LabelServer:
    """The labelling app a round serves while it waits for labels."""

    serve: bool = True
    """Serve the app on the run's database while a round waits; false: you run `rlhf label serve
    --db <output_dir>/labels.sqlite` yourself (e.g. one server for the whole run, behind TLS)."""
    host: str = "127.0.0.1"
    port: int = 0
    """0: a free port, printed when the round starts waiting."""
    lease_minutes: float = 10.0


@dataclass
class RoundsRecipe:
    """Iterative RLHF: rounds of sampling the current policy, labelling, updating the reward model, and RL."""

    reward: str
    """Reward recipe: trains round 0's reward model on its own data (the initial preferences), and
    every round's update (model and data are set per round; its other settings stay)."""
    rl: str
    """RL recipe (PPO or a critic-free estimator) each round runs, from the round's policy."""
    eval: str
    """Evaluation recipe each round runs on its policy (ppo_dir and reward_dir set per round)."""
    prompts: DataSource
    """Prompts to sample candidate answers for: each round takes the next unused ones (and starts
    over when all were used, which the round's manifest records). Never the evaluation prompts."""
    sft_dir: str | None = None
    """The SFT output: round 0's policy, and the KL reference (carry.reference)."""
    sft: str | None = None
    """Or an SFT recipe that round 0 runs first (into `round-0/sft`), instead of sft_dir."""
    output_dir: str = "runs/demo-rounds"
    """`<output_dir>/labels.sqlite` (every round's batch), `round-<k>/` per round, the report."""
    rounds: int = 3
    """Rounds of labelling after round 0 (which trains the initial reward model only)."""
    labels_per_round: int = 64
    """Pairs each round puts in front of the annotators (its labelling budget)."""
    pool_factor: int = 4
    """Candidate pairs sampled per pair kept: the `labels_per_round` the reward model is least
    sure about are kept (active selection); 1 keeps them all (still served least certain first)."""
    samples_per_prompt: int = 2
    """Answers sampled per prompt; they are paired two by two."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Sampling of the candidates."""
    overlap: int = 1
    """Annotators per pair (the labelling app's overlap)."""
    min_labels: int = 1
    """Labels a pair needs before the round goes on; the majority vote decides it."""
    heldout_fraction: float = 0.25
    """Share of each round's labelled pairs never trained on: the reward model's on-policy accuracy
    is measured on it after the update (before the update every pair of the round is unseen)."""
    carry: Carry = field(default_factory=Carry)
    """What carries from round to round."""
    annotator: ScriptedAnnotator | None = None
    """Scripted stand-ins (demo, tests); null: people label in the app."""
    server: LabelServer = field(default_factory=LabelServer)
    """The app served while a round waits."""
    reward_overrides: list[str] = field(default_factory=list)
    """Overrides for the reward recipe, in round 0 and every update (the rounds' own wiring of
    model, data and output_dir comes after them and wins)."""
    rl_overrides: list[str] = field(default_factory=list)
    """Overrides for every round's RL run (before the rounds' wiring of models, seed and output)."""
    eval_overrides: list[str] = field(default_factory=list)
    """Overrides for every round's evaluation (before the rounds' wiring)."""
    initial_reward_dir: str | None = None
    """A reward model to start from instead of training round 0's."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """Processes, nodes and hostfile for the training stages."""
    poll_seconds: float = 2.0
    """How often a waiting round looks at the label count."""
    seed: int = 0
    """Prompt order, candidate sampling and the held-out split; round k's RL uses train.seed + k."""

    def __post_init__(self) -> None:
        if (self.sft_dir is None) == (self.sft is None):
            raise ConfigError("give sft_dir (an SFT output) or sft (an SFT recipe round 0 runs), not both")
        for key, least in (("rounds", 1), ("labels_per_round", 2), ("pool_factor", 1)):
            if getattr(self, key) < least:
                raise ConfigError(f"{key} must be >= {least}, got {getattr(self, key)}")
        if self.annotator is not None and not self.server.serve:
            raise ConfigError(
                "annotator: the scripted annotators label through the app this run serves; set server.serve: true "
                "(or drop annotator: and let people label on your own server)"
            )
        if self.samples_per_prompt < 2 or self.samples_per_prompt % 2:
            raise ConfigError(
                f"samples_per_prompt must be even and >= 2 (answers are paired), got {self.samples_per_prompt}"
            )
        if not 1 <= self.min_labels <= self.overlap:
            raise ConfigError(f"min_labels must be within 1..overlap ({self.overlap}), got {self.min_labels}")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must be within (0, 1), got {self.heldout_fraction}")

    @property
    def sft_path(self) -> str:
        """Round 0's policy: sft_dir, or where round 0 trains it."""
        return self.sft_dir or f"{self.output_dir}/round-0/sft"
