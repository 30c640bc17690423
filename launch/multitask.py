"""Train moebsr on several tasks at once.

    accelerate launch launch/multitask.py --config configs/quickstart.yaml [key=value ...]
    python launch/multitask.py --config configs/quickstart.yaml train.steps=50
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no launch/multitask.py --config configs/quickstart.yaml      # 2 CPU processes (gloo)
"""

from __future__ import annotations

import argparse
import sys

from moebsr.training.runner import run_training_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    return run_training_cli(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
