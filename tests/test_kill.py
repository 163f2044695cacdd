"""Kill -9 at random moments, rerun, and get what an uninterrupted run gets.

Each trial starts the stage script, waits for a random progress line (a
training step, a finished generation batch) plus a random fraction of a
second, kills the process with SIGKILL, and runs the stage again to the end.
One trial kills during start-up instead. `make kill-test` runs these alone.
"""

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from processes import run_stage, start_stage
from test_pod import lora_weights

pytestmark = [pytest.mark.slow, pytest.mark.kill]

TRIALS = 3
FINETUNE = ["data.max_rows=72", "train.epochs=2", "train.checkpoint_every=2"]
DATA = ["data.rewriter=model", "data.prompts=prompts/rewrite_prompts.txt", "data.max_rows=48",
        "data.max_new_tokens=8"]


def kill_at_random(script, overrides, progress_line, last, rng, log_dir):
    """Starts the stage, SIGKILLs it after progress line number k (random in
    1..last-1; 0: during start-up) plus a random delay; returns k."""
    (process,) = start_stage(script, overrides, log_dir=log_dir)
    k = rng.randrange(0, last)
    deadline = time.time() + 600
    if k == 0:
        time.sleep(rng.uniform(1.0, 5.0))
    else:
        while progress_line(k) not in Path(process.log_path).read_text() and process.poll() is None:
            assert time.time() < deadline, "no progress"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.8))
    process.kill()
    process.wait()
    return k


@pytest.fixture(scope="module")
def finetune_reference(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-finetune")
    run_stage("data", FINETUNE + [f"run.root={root / 'reference'}"], log_dir=root)
    run_stage("finetune", FINETUNE + [f"run.root={root / 'reference'}"], log_dir=root)
    return root


@pytest.mark.parametrize("trial", range(TRIALS))
def test_killed_finetune_resumes_to_the_uninterrupted_adapter(finetune_reference, trial):
    root = finetune_reference
    reference = root / "reference" / "cpu_tiny"
    history = json.loads((reference / "finetune" / "history.json").read_text())
    total = len(history["step_loss"])
    run = root / f"trial{trial}" / "cpu_tiny"
    shutil.copytree(reference / "data", run / "data")
    overrides = FINETUNE + [f"run.root={run.parent}"]
    killed_after = kill_at_random(
        "finetune", overrides, lambda k: f"finetune: step {k}/{total},", total, random.Random(trial), run.parent
    )
    output = run_stage("finetune", overrides, log_dir=run.parent)[0]
    resumed = 0
    if "resuming from" in output or "training is complete" in output:
        resumed = int(output.split(" at step ")[1].split("/")[0])
    # checkpoint_every=2: the last save before step k's line is at most 2 steps back.
    assert resumed >= ((killed_after - 1) // 2) * 2, (killed_after, resumed)
    expected, got = lora_weights(reference / "finetune" / "adapter.lora.h5"), lora_weights(run / "finetune" / "adapter.lora.h5")
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
    resumed_history = json.loads((run / "finetune" / "history.json").read_text())
    assert len(resumed_history["step_loss"]) == total  # the same number of steps, none twice
    np.testing.assert_allclose(resumed_history["step_loss"], history["step_loss"], rtol=1e-5)


@pytest.fixture(scope="module")
def data_reference(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-data")
    run_stage("data", DATA + [f"run.root={root / 'reference'}"], log_dir=root)
    return root


@pytest.mark.parametrize("trial", range(TRIALS))
def test_killed_data_stage_resumes_to_the_uninterrupted_rows(data_reference, trial):
    root = data_reference
    run_root = root / f"trial{trial}"
    overrides = DATA + [f"run.root={run_root}"]
    batches = 48 // 8
    kill_at_random(
        "data", overrides, lambda k: f"generate: {8 * k}/", batches, random.Random(100 + trial), run_root
    )
    output = run_stage("data", overrides, log_dir=run_root)[0]
    assert "already written" in output
    expected = (root / "reference" / "cpu_tiny" / "data" / "rewrites.csv").read_bytes()
    assert (run_root / "cpu_tiny" / "data" / "rewrites.csv").read_bytes() == expected


def test_a_changed_config_refuses_the_checkpoint(finetune_reference):
    run = finetune_reference / "reference" / "cpu_tiny"
    (process,) = start_stage(
        "finetune", FINETUNE + [f"run.root={run.parent}", "train.batch_size=4"], log_dir=finetune_reference / "changed"
    )
    process.wait(timeout=600)
    last_line = Path(process.log_path).read_text().strip().splitlines()[-1]
    assert process.returncode != 0
    assert last_line.startswith(f"error: {run / 'finetune' / 'checkpoint.npz'} was written by a run with other settings")
    assert "train.batch_size: 8 then, 4 now" in last_line and "Delete it to start over" in last_line
