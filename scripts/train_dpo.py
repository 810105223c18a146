"""Launch the DPO stage (DPO, IPO, robust DPO, KTO); usable under the deepspeed launcher:

deepspeed --num_gpus 2 scripts/train_dpo.py --config recipes/demo/dpo.yaml [key=value ...]
"""

import sys

from rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main(["dpo", *sys.argv[1:]]))
