"""Launch the PPO stage; usable under the deepspeed launcher:

deepspeed --num_gpus 2 scripts/train_ppo.py --config recipes/demo/ppo.yaml [key=value ...]
"""

import sys

from rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main(["ppo", *sys.argv[1:]]))
