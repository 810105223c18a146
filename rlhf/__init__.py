"""rlhf: supervised fine-tuning, reward modelling and PPO under DeepSpeed.

Importing the package is cheap on purpose (no torch, deepspeed or wandb): the CLI parses and
validates a recipe before any heavy import, so a typo costs a second, not a minute.
"""

__version__ = "0.1.0"
