"""Command line: ``python -m train --config configs/<name>.yaml [key=value ...]``.

Exit status 2 (and nothing loaded or written) for a bad config, override or
model path; the message names the key and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys

from jpeft.errors import CheckpointError
from train.config import ConfigError, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Fine-tune a model with a jpeft method on the job a YAML config describes.",
        epilog="Overrides use dotted keys, e.g.: train.steps=20 lora.rank=4 method=full",
    )
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/smollm2_bbc_lora.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        from train import distributed, model, run  # heavy imports only once the config is valid

        model.resolve(config.model)
        distributed.initialize(config.distributed)
        distributed.check_run(config)
        distributed.build_mesh(config.mesh)  # a mesh that does not fit the devices fails before loading
        if not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # process 0 prints; errors still reach stderr
        run.run(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # a model or checkpoint that does not fit; nothing half-written
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
