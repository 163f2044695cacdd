"""Kill -9 at random moments, rerun, and get what an uninterrupted run gets.

Each trial starts the stage script, waits for a progress line drawn from the
trial's seed (a training step, a finished generation batch) plus a random
fraction of a second, kills the process with SIGKILL, and runs the stage
again to the end (a draw of 0 kills during start-up instead). The preemption
trials send SIGTERM (Cloud TPU's notice) instead: the stage saves where it
is and exits with PREEMPTED_EXIT_CODE. `make kill-test` runs these alone.
"""

import json
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from processes import run_stage, start_stage
from test_pod import assert_same_adapter

from pipeline.parallel.preemption import PREEMPTED_EXIT_CODE

pytestmark = [pytest.mark.slow, pytest.mark.kill]

# Seeds of the trials' kill points: finetune killed after step 12 of 16 (a
# resume from a late checkpoint) and after step 1 (before the first one);
# the data stage after batch 1 and after batch 4 of 6.
FINETUNE_TRIALS = [0, 2]
DATA_TRIALS = [0, 1]
FINETUNE = ["data.max_rows=72", "train.epochs=2", "train.checkpoint_every=2", "train.eval_every=4"]
DATA = [
    "data.rewriter=model",
    "data.prompts=prompts/rewrite_prompts.txt",
    "data.max_rows=48",
    "data.max_new_tokens=8",
]


def wait_for(process, line):
    deadline = time.time() + 600
    while line not in Path(process.log_path).read_text():
        assert time.time() < deadline and process.poll() is None, Path(
            process.log_path
        ).read_text()[-3000:]
        time.sleep(0.05)


def kill_at_random(script, overrides, progress_line, last, rng, log_dir):
    """Starts the stage, SIGKILLs it after progress line number k (random in
    1..last-1; 0: during start-up) plus a random delay; returns k."""
    (process,) = start_stage(script, overrides, log_dir=log_dir)
    k = rng.randrange(0, last)
    if k == 0:
        time.sleep(rng.uniform(1.0, 5.0))
    else:
        wait_for(process, progress_line(k))
        time.sleep(rng.uniform(0.0, 0.8))
    process.kill()
    process.wait()
    return k


def preempt(script, overrides, progress_line, log_dir):
    """Starts the stage, sends SIGTERM after `progress_line`; returns the
    exit code and the output."""
    (process,) = start_stage(script, overrides, log_dir=log_dir)
    wait_for(process, progress_line)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    return process.returncode, Path(process.log_path).read_text()


@pytest.fixture(scope="module")
def finetune_reference(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-finetune")
    run_stage("data", FINETUNE + [f"run.root={root / 'reference'}"], log_dir=root)
    run_stage("finetune", FINETUNE + [f"run.root={root / 'reference'}"], log_dir=root)
    return root


@pytest.mark.parametrize("trial", FINETUNE_TRIALS)
def test_killed_finetune_resumes_to_the_uninterrupted_adapter(finetune_reference, trial):
    root = finetune_reference
    reference = root / "reference" / "cpu_tiny"
    history = json.loads((reference / "finetune" / "history.json").read_text())
    total = len(history["step_loss"])
    run = root / f"trial{trial}" / "cpu_tiny"
    shutil.copytree(reference / "data", run / "data")
    overrides = FINETUNE + [f"run.root={run.parent}"]
    killed_after = kill_at_random(
        "finetune",
        overrides,
        lambda k: f"finetune: step {k}/{total},",
        total,
        random.Random(trial),
        run.parent,
    )
    output = run_stage("finetune", overrides, log_dir=run.parent)[0]
    resumed = 0
    if "resuming from" in output or "training is complete" in output:
        resumed = int(output.split(" at step ")[1].split("/")[0])
    # checkpoint_every=2, saved in the background: the save begun before
    # step k's line may be unfinished, but the one before it is committed
    # (Orbax finishes a save before it begins the next).
    assert resumed >= ((killed_after - 1) // 2) * 2 - 2, (killed_after, resumed)
    assert_same_adapter(reference, run, atol=1e-6)
    resumed_history = json.loads((run / "finetune" / "history.json").read_text())
    assert len(resumed_history["step_loss"]) == total  # the same number of steps, none twice
    np.testing.assert_allclose(resumed_history["step_loss"], history["step_loss"], rtol=1e-5)
    # The validation scores: each step's once, as the uninterrupted run's.
    evaluations, resumed_evaluations = (
        history["validation_score"],
        resumed_history["validation_score"],
    )
    assert [e["step"] for e in resumed_evaluations] == [e["step"] for e in evaluations]
    np.testing.assert_allclose(
        [e["score"] for e in resumed_evaluations], [e["score"] for e in evaluations], atol=1e-5
    )
    assert resumed_history["best"]["step"] == history["best"]["step"]
    assert (
        json.loads((run / "finetune" / "best.json").read_text())["step"] == history["best"]["step"]
    )


@pytest.fixture(scope="module")
def data_reference(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-data")
    run_stage("data", DATA + [f"run.root={root / 'reference'}"], log_dir=root)
    return root


@pytest.mark.parametrize("trial", DATA_TRIALS)
def test_killed_data_stage_resumes_to_the_uninterrupted_rows(data_reference, trial):
    root = data_reference
    run_root = root / f"trial{trial}"
    overrides = DATA + [f"run.root={run_root}"]
    batches = 48 // 8
    kill_at_random(
        "data",
        overrides,
        lambda k: f"generate: {8 * k}/",
        batches,
        random.Random(100 + trial),
        run_root,
    )
    output = run_stage("data", overrides, log_dir=run_root)[0]
    assert "already written" in output
    expected = (root / "reference" / "cpu_tiny" / "data" / "rewrites.csv").read_bytes()
    assert (run_root / "cpu_tiny" / "data" / "rewrites.csv").read_bytes() == expected


def test_a_preempted_finetune_on_a_bucket_resumes_from_the_bucket_alone(
    finetune_reference, gcs_bucket, tmp_path
):
    """The run root on a bucket; SIGTERM during finetune; the local disk
    (the run's mirror) wiped before the rerun, as a preempted slice's is."""
    from etils import epath

    reference = finetune_reference / "reference" / "cpu_tiny"
    mirrors = tmp_path / "mirrors"
    overrides = FINETUNE + [
        f"run.root={gcs_bucket}/runs",
        f"run.mirrors={mirrors}",
        "train.checkpoint_every=0",
    ]  # epoch ends only
    run_stage("data", overrides, log_dir=tmp_path)
    code, output = preempt("finetune", overrides, "finetune: step 3/", tmp_path)
    assert code == PREEMPTED_EXIT_CODE, output[-3000:]
    stopped = int(output.split("finetune: preempted at step ")[1].split(":")[0])
    assert 3 <= stopped < 8  # within the first epoch, whose end is the only other save
    checkpoints = f"{gcs_bucket}/runs/cpu_tiny/finetune/checkpoints"
    assert [p.name for p in epath.Path(checkpoints).iterdir() if p.name.isdigit()] == [str(stopped)]
    shutil.rmtree(mirrors)
    output = run_stage("finetune", overrides, log_dir=tmp_path)[0]
    assert f"resuming from {checkpoints} at step {stopped}/" in output
    run = mirrors / gcs_bucket.removeprefix("gs://") / "runs" / "cpu_tiny"
    assert (run / "data" / "rewrites.csv").read_bytes() == (
        reference / "data" / "rewrites.csv"
    ).read_bytes()
    assert_same_adapter(reference, run, atol=1e-6)
    pushed = epath.Path(f"{gcs_bucket}/runs/cpu_tiny/finetune/adapter.lora.h5")
    assert pushed.read_bytes() == (run / "finetune" / "adapter.lora.h5").read_bytes()


def test_a_preempted_data_stage_keeps_its_batches_and_resumes_to_the_uninterrupted_rows(
    data_reference,
):
    run_root = data_reference / "preempted"
    overrides = DATA + [f"run.root={run_root}"]
    code, output = preempt("data", overrides, "generate: 8/", run_root)
    assert code == PREEMPTED_EXIT_CODE, output[-3000:]
    written = int(output.split("data: preempted with ")[1].split("/")[0])
    assert 8 <= written < 48 and written % 8 == 0
    partial = run_root / "cpu_tiny" / "data" / "rewrites.partial"
    assert sum(len(p.read_text().splitlines()) for p in partial.glob("*.jsonl")) == written
    output = run_stage("data", overrides, log_dir=run_root)[0]
    assert f"{written} already written, {48 - written} to rewrite" in output
    expected = (data_reference / "reference" / "cpu_tiny" / "data" / "rewrites.csv").read_bytes()
    assert (run_root / "cpu_tiny" / "data" / "rewrites.csv").read_bytes() == expected


def test_a_changed_config_refuses_the_checkpoint(finetune_reference):
    run = finetune_reference / "reference" / "cpu_tiny"
    (process,) = start_stage(
        "finetune",
        FINETUNE + [f"run.root={run.parent}", "train.batch_size=4"],
        log_dir=finetune_reference / "changed",
    )
    process.wait(timeout=600)
    last_line = Path(process.log_path).read_text().strip().splitlines()[-1]
    assert process.returncode != 0
    assert last_line.startswith(
        f"error: {run / 'finetune' / 'checkpoints'} holds a checkpoint written by a run with "
        "other settings"
    )
    assert "train.batch_size: 8 then, 4 now" in last_line and "Delete it to start over" in last_line
