"""Shared command line of the stage scripts: a config file and overrides.

    python scripts/finetune.py --config configs/kaggle_tpu_v3_8.yaml lora.rank=8

Reads the config, then prepares the process (JAX backend, virtual devices,
TensorFlow kept off the accelerators) before any stage module is imported,
and fetches the inputs that are on a bucket (`pipeline/run/storage.py`).
Bad input (`pipeline.errors.InputError`) ends the stage with its one-line
message; any other error keeps its traceback; a stage stopped by a
preemption notice (SIGTERM) exits with code 75 once it has saved.
`VERBOSE=1` in the environment also shows the native libraries' start-up
lines and the traceback of input errors.
"""

import argparse
import importlib
import sys
import traceback

from pipeline.errors import InputError
from pipeline.parallel.runtime import setup_environment, verbose
from pipeline.run.config import ConfigError, load_config, split_grid
from pipeline.run.storage import localized


def parse(description, grid=False):
    """The config (localized); with `grid`, (config, grid axes): overrides
    whose value lists values of their key (`lora.rank=[2,4]`) are the axes
    of a sweep's grid (`split_grid`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config",
        default=None,
        help="YAML config (default: configs/cpu_tiny.yaml, the embedded default)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. lora.rank=8 train.epochs=2"
    )
    args = parser.parse_args()
    try:
        overrides, axes = split_grid(args.overrides) if grid else (args.overrides, None)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    setup_environment(cfg.distribution, cfg.hardware.memory_fraction, cfg.run.compilation_cache)
    try:
        cfg = localized(cfg)  # gs:// inputs, fetched
    except InputError as e:
        sys.exit(f"error: {e}")
    return (cfg, axes) if grid else cfg


def main(description, module, function):
    """Runs `module.function(cfg)` once the process is prepared."""
    cfg = parse(description)
    run_or_exit(getattr(importlib.import_module(module), function), cfg)


def run_or_exit(stage, cfg):
    """Runs `stage(cfg)`; on an error prints its one line (input errors) or
    its traceback and ends the process with exit code 1, at once on a pod
    (`hosts.leave`). A stage stopped by a preemption notice, having saved
    its work, ends with `PREEMPTED_EXIT_CODE` (75)."""
    from pipeline.parallel import hosts
    from pipeline.parallel.preemption import PREEMPTED_EXIT_CODE, Preempted

    try:
        stage(cfg)
    except Preempted as notice:
        print(notice, file=sys.stderr)
        hosts.leave(PREEMPTED_EXIT_CODE)
    except Exception as error:
        if isinstance(error, InputError) and not verbose():
            print(f"error: {error}", file=sys.stderr)
        else:
            traceback.print_exc()
        hosts.leave(1)
