"""Launch the SFT stage; usable under the deepspeed launcher:

deepspeed --num_gpus 2 scripts/train_sft.py --config recipes/demo/sft.yaml [key=value ...]
"""

import sys

from rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
