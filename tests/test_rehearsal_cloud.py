"""Rehearsal of the Cloud TPU run: `scripts/tpu_pod.py`, the README's
command, against a stand-in `gcloud` (tests/standins/gcloud) first on PATH
that plays a 2-worker slice on this machine: each worker a folder, `ssh
--worker=all` a process per worker, the two forming a pod over gloo.

Three paths: the whole run (`up ... --delete`), a stage failing on one
worker, and this machine's connection dropping mid-run.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

from pipeline.text import rules
from processes import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.pod]

SIZES = ["distribution.mesh_shape=[2,4]", "distribution.host_device_count=4", "model.preset=data/gemma_tiny",
         "score.encoder=data/encoder", "data.max_rows=16", "data.max_new_tokens=8", "train.checkpoint_every=0",
         "predict.max_new_tokens=8", "mean_prompt.steps=2", "mean_prompt.beam_width=4"]


@pytest.fixture(scope="module")
def cloud(tiny, tmp_path_factory):
    """(environment with the stand-in gcloud first on PATH, the --data arguments)."""
    folder = tmp_path_factory.mktemp("cloud")
    paragraphs = [p.strip() for p in (ROOT / "demo" / "texts.txt").read_text().split("\n\n") if p.strip()]
    pd.DataFrame({"text": paragraphs}).to_csv(folder / "source_texts.csv", index=False)
    pd.DataFrame({"id": [f"t{i}" for i in range(5)], "original_text": paragraphs[:5],
                  "rewritten_text": [rules.rewrite(p, t) for p, t in zip(rules.RULES, paragraphs[:5])]}
                 ).to_csv(folder / "test.csv", index=False)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MAKEFLAGS", "MAKELEVEL")}
    env.update(PATH=f"{ROOT / 'tests' / 'standins'}{os.pathsep}{env['PATH']}", STANDIN_GCLOUD_ROOT=str(folder / "slices"),
               STANDIN_GCLOUD_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    data = [f"--data={path}" for path in (tiny.preset, tiny.encoder, folder / "source_texts.csv", folder / "test.csv")]
    return env, data, folder


def tpu_pod(env, *words, check=True, timeout=1500):
    result = subprocess.run([sys.executable, "scripts/tpu_pod.py", *words, "--zone=standin-a", "--poll-seconds=1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    return result


def test_up_runs_every_stage_on_a_bucket_fetches_the_logs_and_deletes_the_slice(cloud, tmp_path, gcs_bucket):
    """The README's command: the run root on a bucket (the tests' emulator,
    which both workers reach), so the outputs and checkpoints are there and
    only the workers' logs come back."""
    from etils import epath

    env, data, folder = cloud
    env = dict(env, **{k: os.environ[k] for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                                  "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")})
    result = tpu_pod(env, "up", "--name=whole", *data, "--stage=all", "--delete", f"--into={tmp_path}", *SIZES,
                     f"run.root={gcs_bucket}/runs")
    run = f"{gcs_bucket}/runs/cloud_tpu_v3_32"
    with epath.Path(f"{run}/predict/submission.csv").open() as f:
        submission = pd.read_csv(f, dtype=str, keep_default_na=False)
    assert list(submission["id"]) == [f"t{i}" for i in range(5)] and (submission["rewrite_prompt"] != "").all()
    assert json.loads(epath.Path(f"{run}/score_holdout/score.json").read_text())["rows"] >= 1
    assert [p.name for p in epath.Path(f"{run}/finetune/checkpoints").iterdir() if p.name.isdigit()]
    assert not (tmp_path / "cloud_tpu_v3_32" / "predict").exists()  # nothing fetched but the logs
    for worker in (0, 1):
        log = (tmp_path / "cloud_tpu_v3_32" / "pod-logs" / f"worker-{worker}.log").read_text()
        assert f"worker {worker}: done" in log and "evaluate" in log
    assert "pod: worker 0 | " in result.stdout  # progress while waiting
    assert "setup: Python 3." in result.stdout  # each worker found (or fetched) a Python 3.11+
    assert not (folder / "slices" / "whole").exists()


def test_a_stage_failing_on_one_worker_is_named_its_logs_fetched_and_the_slice_deleted(cloud, tmp_path):
    env, data, folder = cloud
    tpu_pod(env, "create", "--name=broken")
    tpu_pod(env, "setup", "--name=broken", *data)
    shutil.rmtree(folder / "slices" / "broken" / "worker-1" / "prompt-recovery" / "data" / "gemma_tiny")
    result = tpu_pod(env, "run", "--name=broken", "--stage=all", "--delete", f"--into={tmp_path}", *SIZES, check=False)
    assert result.returncode != 0
    assert "stage data failed on worker 1 (make exited " in result.stderr
    assert "gemma_tiny" in (tmp_path / "cloud_tpu_v3_32" / "pod-logs" / "worker-1.log").read_text()
    assert not (folder / "slices" / "broken").exists()


def test_a_dropped_connection_leaves_the_run_going_and_status_logs_fetch_pick_it_up(cloud, tmp_path):
    env, data, folder = cloud
    launcher = subprocess.Popen(
        [sys.executable, "scripts/tpu_pod.py", "up", "--name=dropped", "--zone=standin-a", "--poll-seconds=1", *data,
         "--stage=data", *SIZES], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in launcher.stdout:
        seen.append(line)
        if "pod: worker 1: running" in line:
            break
    launcher.kill()  # the laptop's connection drops
    launcher.wait()
    assert any("pod: worker 1: running" in line for line in seen), "".join(seen)
    deadline = time.time() + 900
    while True:
        status = tpu_pod(env, "status", "--name=dropped").stdout
        if status.count(": done") == 2:
            break
        assert "failed" not in status and "stopped" not in status and time.time() < deadline, status
        time.sleep(2)
    logs = tpu_pod(env, "logs", "--name=dropped", "--lines=5").stdout
    assert "=== worker 0:" in logs and "=== worker 1:" in logs and "worker 1: done" in logs
    tpu_pod(env, "fetch", "--name=dropped", f"--into={tmp_path}")
    assert len(pd.read_csv(tmp_path / "cloud_tpu_v3_32" / "data" / "rewrites.csv")) == 16
    tpu_pod(env, "delete", "--name=dropped")
    assert not (folder / "slices" / "dropped").exists()
