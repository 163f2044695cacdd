"""The pod simulation: every stage on 2 processes x 4 virtual devices (the
configs' multi-host path) gives what one process with 8 devices gives on
the same [2, 4] mesh. `make pod-test` runs these alone."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from processes import ROOT, free_port, run_stage, start_stage

from pipeline.parallel.preemption import PREEMPTED_EXIT_CODE

pytestmark = [pytest.mark.slow, pytest.mark.pod]

# The embedded default, small, with the model rewriting (accelerator work in
# the data stage too) and the data axis spanning the two processes.
SETTINGS = [
    "data.rewriter=model",
    "data.prompts=prompts/rewrite_prompts.txt",
    "data.max_rows=32",
    "data.max_new_tokens=12",
    "distribution.mesh_shape=[2,4]",
    "train.epochs=2",
    "train.checkpoint_every=3",
    "train.eval_every=2",
    "predict.max_new_tokens=8",
    "mean_prompt.steps=3",
    "mean_prompt.beam_width=5",
]
STAGES = ["data", "finetune", "mean_prompt", "predict", "score"]


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """(one-process run folder, pod run folder, pod logs per stage)."""
    root = tmp_path_factory.mktemp("pod")
    logs = {}
    for stage in STAGES:
        run_stage(
            stage, SETTINGS + [f"run.root={root / 'one'}"], processes=1, log_dir=root / "logs-one"
        )
        logs[stage] = run_stage(
            stage, SETTINGS + [f"run.root={root / 'pod'}"], processes=2, log_dir=root / "logs-pod"
        )
    return root / "one" / "cpu_tiny", root / "pod" / "cpu_tiny", logs


def lora_weights(path):
    found = {}
    with h5py.File(path) as f:
        f.visititems(
            lambda name, item: (
                found.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None
            )
        )
    return found


def assert_same_adapter(expected_run, got_run, atol):
    expected = lora_weights(expected_run / "finetune" / "adapter.lora.h5")
    got = lora_weights(got_run / "finetune" / "adapter.lora.h5")
    assert expected.keys() == got.keys() and len(expected) > 2
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=atol, err_msg=name)


def start_pod_finetune_until(overrides, line, log_dir):
    """Starts finetune on two processes; returns them once process 0 printed `line`."""
    started = start_stage("finetune", overrides, processes=2, log_dir=log_dir)
    deadline = time.time() + 600
    while line not in Path(started[0].log_path).read_text():
        assert time.time() < deadline and all(p.poll() is None for p in started), Path(
            started[0].log_path
        ).read_text()
        time.sleep(0.05)
    return started


def test_data_stage_writes_the_same_rewrites(runs):
    one, pod, logs = runs
    assert (pod / "data" / "rewrites.csv").read_bytes() == (
        one / "data" / "rewrites.csv"
    ).read_bytes()
    # Both processes decoded every batch (their rows of it); only process 0 wrote.
    assert all("generate: 32/32 rows" in output for output in logs["data"])


def test_finetune_gives_the_same_adapter(runs):
    one, pod, logs = runs
    expected, got = (
        lora_weights(one / "finetune" / "adapter.lora.h5"),
        lora_weights(pod / "finetune" / "adapter.lora.h5"),
    )
    assert expected.keys() == got.keys() and len(expected) > 2
    for name in expected:
        # The cross-process sums run in another order: measured up to 1.3e-5 after 2 epochs.
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=5e-5, err_msg=name)
    one_history = json.loads((one / "finetune" / "history.json").read_text())
    pod_history = json.loads((pod / "finetune" / "history.json").read_text())
    np.testing.assert_allclose(pod_history["step_loss"], one_history["step_loss"], rtol=1e-5)
    # Every host generated the validation rows; the scores are the one process's.
    assert len(one_history["validation_score"]) > 2
    assert [e["step"] for e in pod_history["validation_score"]] == [
        e["step"] for e in one_history["validation_score"]
    ]
    np.testing.assert_allclose(
        [e["score"] for e in pod_history["validation_score"]],
        [e["score"] for e in one_history["validation_score"]],
        atol=1e-4,
    )
    assert (pod / "finetune" / "best.lora.h5").exists()
    assert all("finetune: epoch 2/2 done" in output for output in logs["finetune"])
    # Each host feeds only the rows its devices hold: half of every global batch.
    for process, output in enumerate(logs["finetune"]):
        assert f"finetune: process {process} feeds 4 of the 8 rows of every batch" in output


def test_killed_pod_finetune_resumes_to_the_uninterrupted_adapter(runs, tmp_path):
    """Both hosts are killed (SIGKILL) after a checkpoint; the rerun on two
    processes resumes there and ends with the uninterrupted pod's adapter."""
    _, pod, _ = runs
    root = tmp_path / "killed"
    shutil.copytree(pod / "data", root / "cpu_tiny" / "data")
    overrides = SETTINGS + [f"run.root={root}"]
    # checkpoint_every=3: the step-4 line comes after the step-3 checkpoint.
    started = start_pod_finetune_until(overrides, "finetune: step 4/", tmp_path)
    for process in started:
        process.kill()
        process.wait()
    outputs = run_stage("finetune", overrides, processes=2, log_dir=tmp_path)
    assert all("finetune: resuming from" in output for output in outputs)
    assert_same_adapter(pod, root / "cpu_tiny", atol=5e-5)


def test_a_preempted_pod_saves_one_step_on_every_host_and_resumes_on_another_mesh(
    runs, tmp_path, gcs_bucket
):
    """SIGTERM (Cloud TPU's notice) reaches one host only; both save the same
    step into the bucket, each host its own shards, and exit with
    PREEMPTED_EXIT_CODE. One process on a [1, 8] mesh then resumes that
    checkpoint (each array read into its new sharding) and ends with the
    adapter of the uninterrupted run."""
    from etils import epath

    one, pod, _ = runs
    mirrors = (
        tmp_path / "mirrors"
    )  # the run root is on the bucket; its data stage's output already here
    shutil.copytree(
        pod / "data", mirrors / gcs_bucket.removeprefix("gs://") / "pod" / "cpu_tiny" / "data"
    )
    checkpoints = f"{gcs_bucket}/pod/cpu_tiny/finetune/checkpoints"
    overrides = SETTINGS + [f"run.root={gcs_bucket}/pod", f"run.mirrors={mirrors}"]
    started = start_pod_finetune_until(overrides, "finetune: step 2/", tmp_path)
    started[1].send_signal(signal.SIGTERM)
    codes = [process.wait(timeout=300) for process in started]
    outputs = [Path(process.log_path).read_text() for process in started]
    assert codes == [PREEMPTED_EXIT_CODE] * 2, outputs[0][-3000:] + outputs[1][-3000:]
    steps = {output.split("finetune: preempted at step ")[1].split(":")[0] for output in outputs}
    assert len(steps) == 1  # the same step on both hosts
    (step,) = steps
    assert max(int(p.name) for p in epath.Path(checkpoints).iterdir() if p.name.isdigit()) == int(
        step
    )
    (output,) = run_stage(
        "finetune", overrides + ["distribution.mesh_shape=[1,8]"], log_dir=tmp_path
    )
    assert f"resuming from {checkpoints} at step {step}/" in output
    assert_same_adapter(
        one, mirrors / gcs_bucket.removeprefix("gs://") / "pod" / "cpu_tiny", atol=5e-5
    )


def test_no_host_is_stranded_while_process_0_works_alone(runs, tmp_path):
    """Process 0 searches for the mean prompt alone for longer than JAX's
    shutdown barrier waits; the other host waits for it and both end well."""
    _, pod, _ = runs
    timeout = 1
    overrides = SETTINGS + [
        f"run.root={pod.parent}",
        f"distribution.shutdown_timeout_seconds={timeout}",
        "mean_prompt.out=mean_prompt_long",
        "mean_prompt.vocabulary=pieces",
        "mean_prompt.top_fraction=1.0",
        "mean_prompt.steps=8",
        "mean_prompt.beam_width=20",
        "mean_prompt.moves=edit",
    ]
    run_stage("mean_prompt", overrides, processes=2, log_dir=tmp_path)
    search = json.loads((pod / "mean_prompt_long" / "search.json").read_text())
    assert (
        search["seconds"] > 3 * timeout
    )  # longer than the barrier's timeout, or the test shows nothing


def test_predict_mean_prompt_and_score_agree(runs):
    one, pod, _ = runs
    for name in (
        "predict/submission.csv",
        "predict/model_outputs.csv",
        "mean_prompt/mean_prompt.txt",
    ):
        assert (pod / name).read_bytes() == (one / name).read_bytes(), name
    assert len(pd.read_csv(pod / "predict" / "submission.csv")) == 5  # the holdout rows
    scores = [json.loads((run / "score" / "score.json").read_text())["score"] for run in (one, pod)]
    assert scores[0] == scores[1]


def test_only_process_0_writes(runs):
    one, pod, _ = runs
    # Every row written once; a second writer would have opened TensorBoard
    # event files of its own (each writer names its own file).
    assert (
        sum(
            len(p.read_text().splitlines())
            for p in (pod / "data" / "rewrites.partial").glob("*.jsonl")
        )
        == 32
    )
    events = [sorted(p.parent.name for p in run.rglob("*tfevents*")) for run in (one, pod)]
    assert events[0] == events[1] and events[0]


REACHABLE = """
import sys
from pipeline.run.config import DistributionConfig
from pipeline.parallel.runtime import setup_environment

port, process_id, folder = sys.argv[1:]
cfg = DistributionConfig(multi_host=True, coordinator_address=f"localhost:{port}", num_processes=2,
                         process_id=int(process_id), host_device_count=1)
setup_environment(cfg)
from pipeline.parallel import checkpoint, hosts

hosts.initialize(cfg)
checkpoint.check_reachable(folder)
print("every host sees the folder")
"""


@pytest.mark.parametrize("shared", [True, False])
def test_a_checkpoint_folder_that_a_host_cannot_see_is_refused_on_every_host(tmp_path, shared):
    """On a pod each host writes its own shards of a checkpoint: a folder on
    each worker's own disk would leave every checkpoint in pieces."""
    port = free_port()
    folders = (
        [tmp_path / "shared"] * 2 if shared else [tmp_path / "worker-0", tmp_path / "worker-1"]
    )
    started = [
        subprocess.Popen(
            [sys.executable, "-c", REACHABLE, str(port), str(i), str(folders[i])],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in started]
    if shared:
        assert all(output.strip().endswith("every host sees the folder") for output in outputs), (
            outputs
        )
    else:
        for output in outputs:
            assert (
                "is not shared by every host (process(es) [1] do not see what process 0 writes "
                "there)" in output
            )
            assert "every host sees the folder" not in output


LOAD_ADAPTER = """
import sys
from pipeline.run.config import load_config
from pipeline.parallel.runtime import setup_environment

port, process_id, adapter, preset = sys.argv[1:]
cfg = load_config(None, [
    f"model.preset={preset}", "distribution.multi_host=true", "distribution.num_processes=2",
    f"distribution.coordinator_address=localhost:{port}", f"distribution.process_id={process_id}",
    "distribution.host_device_count=4", "distribution.mesh_shape=[2,4]",
])
setup_environment(cfg.distribution)
from pipeline import keras_internals
from pipeline.models.model import load_adapter, load_model
from pipeline.parallel import hosts

hosts.initialize(cfg.distribution)
causal_lm, _ = load_model(cfg, [8])
how, _ = load_adapter(causal_lm, adapter, cfg.model.preset)
layers = keras_internals.lora_layers(causal_lm.backbone).values()
total = sum(float(abs(hosts.to_numpy(layer.lora_kernel_b.value)).sum()) for layer in layers)
print(f"adapter {how}: {total:.6f}")
"""


def test_an_adapter_every_host_sees_is_read_by_each_and_one_only_process_0_sees_is_sent(
    runs, tiny, tmp_path
):
    """predict's adapter on a pod: where every host has the file (a bucket
    run: each fetches it; a shared folder) none is sent through a
    collective; a file on worker 0's disk alone still loads on every host."""
    _, pod, _ = runs
    adapter = pod / "finetune" / "adapter.lora.h5"
    seen = {}
    for shared in (True, False):
        port = free_port()
        paths = [adapter, adapter if shared else tmp_path / "worker-1" / "adapter.lora.h5"]
        env = {
            k: v for k, v in os.environ.items() if k != "XLA_FLAGS"
        }  # each process: 4 devices, from the config
        started = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    LOAD_ADAPTER,
                    str(port),
                    str(i),
                    str(paths[i]),
                    str(tiny.preset),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        outputs = [process.communicate(timeout=600)[0] for process in started]
        lines = [
            [line for line in output.splitlines() if line.startswith("adapter ")]
            for output in outputs
        ]
        assert all(len(found) == 1 for found in lines), outputs
        seen[shared] = {found[0] for found in lines}
    (read_by_each,), (sent,) = seen[True], seen[False]
    assert read_by_each.startswith("adapter read by every host: ") and sent.startswith(
        "adapter sent by process 0: "
    )
    assert read_by_each.split(": ")[1] == sent.split(": ")[1] and float(sent.split(": ")[1]) > 0
