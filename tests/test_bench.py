"""The accelerator benchmark's every path, on the tiny architecture on the
CPU: no accelerator here, so this is what keeps it runnable for the next
machine that has one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_runs_every_case_in_its_own_process_on_the_tiny_architectures(tmp_path):
    """Gemma's (KerasHub's exporter gives the transformers config) and Gemma
    4's (the family's own transformers config, position ids as model
    inputs), each through the pipeline's decoder and KerasHub's `generate`."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "throughput_gpu.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/gpu_throughput.py",
            "--architectures",
            "tiny,gemma4_tiny",
            "--quick",
            "--smoke",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (
        result["device"]
        and result["quick"]
        and {"jax", "keras", "keras-hub"} <= set(result["versions"])
    )
    for name in ("tiny", "gemma4_tiny"):
        tiny = result[name]
        assert not [
            case for case in ("pipeline", "keras_hub", "data", "hf") if "failed" in tiny[case]
        ], tiny
        assert set(tiny["pipeline"]["decoding"]) == {"8", "32"}
        assert tiny["pipeline"]["decoding"]["32"]["fraction_of_bandwidth_floor"] > 0
        assert tiny["pipeline"]["decoding"]["32"]["bytes_accessed_ratio"] > 1
        assert tiny["data"]["decoder_batch"]["rows"] == 32
        assert {"training_vs_keras_hub", "training_vs_hf", "decoding_32_rows_vs_keras_hub"} <= set(
            tiny["ratios"]
        )
