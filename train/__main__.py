"""Command line: ``python -m train --config configs/<name>.yaml [key=value ...]``.

Exit status 2 (and nothing written) for anything that can be checked before training:
a bad config or override, a missing or unreadable model or data file, method settings
that do not fit the model, a run folder that is not this run's. The message names the
file or setting and the fix. Exit status 3 when training stops because the loss stopped
being finite (the checkpoints saved before stay). A run folder written before such an
error is never left half-way: see :mod:`train.run_folder` and :mod:`jpeft.checkpoint`.
"""

from __future__ import annotations

import argparse
import os
import sys

from jpeft.errors import CheckpointError
from jpeft.quant import QuantizationError
from jpeft.sharding import ShardingError
from jpeft.tree import RuleError
from train import distributed, loading, run
from train.config import ConfigError, load_config
from train.records import write_record
from train.trainer import TrainingStopped

# The errors about inputs: each names the file or the setting.
EXPECTED = {
    ConfigError: "config error",
    CheckpointError: "checkpoint error",
    QuantizationError: "quantization error",
    RuleError: "target error",
    ShardingError: "sharding error",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Fine-tune a model with a jpeft method on the job a YAML config describes.",
        epilog="Overrides use dotted keys, e.g.: train.steps=20 lora.rank=4 (a section the run does not use is an "
               "error: with method=full, drop the lora section by lora=null)",
    )
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/smollm2_bbc_lora.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def _input_errors() -> dict[type, str]:
    """The errors reported as one line and exit status 2, with their labels."""
    return EXPECTED


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        loading.resolve(config.model)
        distributed.initialize(config.distributed)
        distributed.check_run(config)
        distributed.build_mesh(config.mesh)  # a mesh that does not fit the devices fails before loading
        if not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # process 0 prints; errors still reach stderr
        summary = run.run(config)
        if distributed.is_main():
            write_record(f"train/{config.name}", {"method": config.method, "task": config.task, **summary})
    except tuple(_input_errors()) as e:
        kind = next(label for cls, label in _input_errors().items() if isinstance(e, cls))
        print(f"{kind}: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
