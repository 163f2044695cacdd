"""Test set-up: JAX on 8 virtual CPU devices (the TPU v3-8 mesh), the tiny
stand-in artifacts built once per session (skipped when already built)."""

import os
from pathlib import Path

from pipeline.run.config import DistributionConfig
from pipeline.parallel.runtime import setup_environment

ROOT = Path(__file__).resolve().parent.parent

setup_environment(DistributionConfig(host_device_count=8))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    from pipeline.models.tiny import TINY_DIR, build_tiny_artifacts

    return build_tiny_artifacts(ROOT / TINY_DIR, log=lambda *_: None)


@pytest.fixture
def tiny_cfg(tiny, tmp_path):
    """The embedded default, writing into a temporary run root."""
    from pipeline.run.config import load_config

    os.chdir(ROOT)  # config paths are relative to the repository root
    return load_config(None, [f"run.root={tmp_path}", f"model.preset={tiny.preset}", f"score.encoder={tiny.encoder}"])


@pytest.fixture(scope="session")
def tiny_model(tiny):
    """(GemmaCausalLM without preprocessor, tokenizer) on the (1, 8) mesh."""
    from pipeline.run.config import load_config
    from pipeline.models.model import load_model

    cfg = load_config(None, [f"model.preset={tiny.preset}"])
    return load_model(cfg, [8])


@pytest.fixture(scope="session")
def demo_run(tiny, tmp_path_factory):
    """The demo (every stage, base and fine-tuned) run once per session:
    (config, scores). Tests of what comes after training share it."""
    from pipeline.run.config import load_config
    from pipeline.workflows.demo import run_demo

    os.chdir(ROOT)
    root = tmp_path_factory.mktemp("demo")
    cfg = load_config(None, [f"run.root={root}", f"model.preset={tiny.preset}", f"score.encoder={tiny.encoder}"])
    logs = []
    scores = run_demo(cfg, log=logs.append)
    return cfg, scores, logs
