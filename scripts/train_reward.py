"""Launch the reward-model stage; usable under the deepspeed launcher:

deepspeed --num_gpus 2 scripts/train_reward.py --config recipes/demo/reward.yaml [key=value ...]
"""

import sys

from rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main(["reward", *sys.argv[1:]]))
