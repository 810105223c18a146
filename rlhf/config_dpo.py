"""Recipe schema of the offline preference stage: DPO and its variants, and KTO.

Kept apart from `config.py` (SFT, reward) and `config_rl.py` (PPO) to keep each module small;
the same loader checks it (unknown keys and wrong types are errors naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config import ConfigError, DataConfig, DeepSpeedConfig, PeftConfig, ModelConfig, TrackingConfig, TrainConfig

DPO_LOSSES = {
    "sigmoid": "DPO, Rafailov et al. 2023 (arXiv:2305.18290). With label_smoothing > 0 it is conservative "
    "DPO (cDPO, Mitchell 2023): the labels are trusted with probability 1 - label_smoothing.",
    "ipo": "IPO, Azar et al. 2023 (arXiv:2310.12036): a squared loss on the log-ratio margin that does not "
    "push it to infinity on deterministic preferences; beta is the paper's tau.",
    "robust": "Robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409): an unbiased loss under labels flipped "
    "with probability label_smoothing (in [0, 0.5)).",
    "hinge": "SLiC-HF hinge loss, Zhao et al. 2023 (arXiv:2305.10425).",
    "exo_pair": "EXO, Ji et al. 2024 (arXiv:2402.00856); needs label_smoothing > 0 (the paper uses 1e-3).",
    "nca_pair": "NCA, Chen et al. 2024 (arXiv:2402.05369).",
    "bco_pair": "BCO on pairs, Jung et al. 2024 (arXiv:2404.04656).",
    "sppo_hard": "SPPO with hard labels, Wu et al. 2024 (arXiv:2405.00675).",
    "aot": "AOT, Melnyk et al. 2024 (arXiv:2406.05882).",
    "aot_unpaired": "AOT for unpaired data, Melnyk et al. 2024.",
    "apo_zero": "APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266).",
    "apo_down": "APO-down, D'Oosterlinck et al. 2024.",
    "discopop": "DiscoPOP, Chris Lu et al. 2024 (arXiv:2406.08414).",
    "sigmoid_norm": "DPO on length-normalised log-probabilities.",
}
"""The pairwise loss variants, each one `loss_type` value away (TRL 1.16's `DPOConfig.loss_type`)."""

KTO_LOSSES = {
    "kto": "KTO, Ethayarajh et al. 2024 (arXiv:2402.01306): single responses marked desirable or not.",
    "apo_zero_unpaired": "APO-zero for unpaired data, D'Oosterlinck et al. 2024.",
}
"""The single-response (unpaired) loss variants (TRL 1.16's `KTOConfig.loss_type`)."""


@dataclass
class DPORecipe:
    """Offline preference optimisation of the SFT model: DPO and its variants on pairs, or KTO on
    single responses judged good or bad. No reward model, no sampling; the reference is the SFT
    model (under LoRA the same weights with the adapter switched off, not a second copy)."""

    model: ModelConfig
    """`name_or_path` is the SFT stage's output directory (or a converted chat model)."""
    data: DataConfig
    """Preference pairs (prompt / chosen / rejected, as the reward stage reads them, labelling
    exports included). For KTO also single responses: prompt / completion (or response) / label
    (true or 1 = desirable); pairs are split into one desirable and one undesirable response."""
    method: Literal["dpo", "kto"] = "dpo"
    """'dpo': pairwise losses (`trl.DPOTrainer`); 'kto': single-response losses (`trl.KTOTrainer`)."""
    loss_type: str = "sigmoid"
    """The loss: for method dpo one of sigmoid (DPO), ipo, robust, hinge, exo_pair, nca_pair,
    bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm; for kto one
    of kto, apo_zero_unpaired. Each is documented with its paper in `rlhf.config_dpo`."""
    beta: float = 0.1
    """Strength of the pull towards the reference: higher beta, smaller departure from SFT."""
    label_smoothing: float = 0.0
    """Assumed probability that a preference label is flipped: robust DPO (loss_type robust, in
    [0, 0.5)) or conservative DPO (loss_type sigmoid). The demo annotator flips 10% of labels."""
    desirable_weight: float = 1.0
    """KTO: weight of the desirable responses' loss (raise it when they are the minority)."""
    undesirable_weight: float = 1.0
    """KTO: weight of the undesirable responses' loss."""
    precompute_ref_log_probs: bool = False
    """Score the whole dataset with the reference once before training, then drop it from memory."""
    best_metric: Literal["loss", "accuracy"] = "loss"
    """Validation metric for early stopping and the kept checkpoint: the loss, or (DPO only) the
    preference accuracy of the implicit reward."""
    output_dir: str = "runs/demo"
    """Run directory; this stage writes `<output_dir>/dpo/`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """LoRA or a mergeable relative (dora, loha, lokr, ia3); the reference is then the model with its
    adapter disabled."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """wandb and the local metrics log."""
    resume: str = "auto"
    """'auto', 'never' or a checkpoint path, as in SFT."""
    demo_assets: str | None = None
    """Build the demo assets into this directory first (demo recipes only)."""

    def __post_init__(self) -> None:
        losses = DPO_LOSSES if self.method == "dpo" else KTO_LOSSES
        if self.loss_type not in losses:
            raise ConfigError(
                f"loss_type {self.loss_type!r} is not a {self.method} loss; choose one of {sorted(losses)}"
            )
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing is a flip probability in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust", "exo_pair"):
            raise ConfigError(
                f"label_smoothing is used by loss_type sigmoid, robust and exo_pair only, not {self.loss_type!r}"
            )
        if self.loss_type == "exo_pair" and not self.label_smoothing:
            raise ConfigError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        if self.best_metric == "accuracy" and self.method == "kto":
            raise ConfigError("best_metric: accuracy is a pairwise measure; KTO selects on the loss")
        if min(self.desirable_weight, self.undesirable_weight) <= 0:
            raise ConfigError("desirable_weight and undesirable_weight must be > 0")
        if self.precompute_ref_log_probs and not self.peft.enabled and self.data.test_fraction > 0:
            raise ConfigError(
                "precompute_ref_log_probs with full fine-tuning drops the reference after the first "
                "pass, so the test split could not be scored at the end; use LoRA (the reference is "
                "the adapter switched off) or data.test_fraction: 0"
            )
        if self.precompute_ref_log_probs and self.model.autocast != "none":
            raise ConfigError(
                "precompute_ref_log_probs computes the reference log-probs while the trainer is built, "
                "before model.autocast applies, so reference and policy would compute in different "
                "precisions: set model.autocast: none, or precompute_ref_log_probs: false"
            )
        if self.method == "kto" and self.loss_type == "kto" and self.train.micro_batch_size < 2:
            raise ConfigError(
                "KTO estimates its KL term from mismatched responses within a batch: "
                "train.micro_batch_size must be >= 2"
            )
        if self.peft.quant_bits is not None:
            raise ConfigError(
                "peft.method=qlora (a quantized base) is not supported by the DPO stage: its reference is "
                "the base with the adapter switched off, which would then be the 4-bit model, not the SFT "
                "policy; use peft.method: lora"
            )
        self.peft.require_mergeable(
            "DPO", "its reference is the policy with the adapter switched off, tested here with mergeable adapters only"
        )
