"""Shared command line of the stage scripts: a config file and overrides.

    python scripts/finetune.py --config configs/kaggle_tpu_v3_8.yaml lora.rank=8

Reads the config, then prepares the process (JAX backend, virtual devices,
TensorFlow kept off the accelerators) before any stage module is imported.
"""

import argparse
import importlib
import sys

from pipeline.config import ConfigError, load_config
from pipeline.runtime import setup_environment


def parse(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", default=None, help="YAML config (default: configs/cpu_tiny.yaml, the embedded default)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. lora.rank=8 train.epochs=2")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    setup_environment(cfg.distribution)
    return cfg


def main(description, module, function):
    """Runs `module.function(cfg)` once the process is prepared; bad input
    ends with its one-line message instead of a traceback."""
    cfg = parse(description)
    exit_on_bad_input(getattr(importlib.import_module(module), function), cfg)


def exit_on_bad_input(stage, cfg):
    try:
        stage(cfg)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
