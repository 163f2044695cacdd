import shlex
import subprocess
import sys
import tarfile

from pipeline.parallel.launch import archive_repository
from processes import ROOT


def dry_run(*args):
    result = subprocess.run([sys.executable, "scripts/tpu_pod.py", *args, "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    return [shlex.split(line.removeprefix("(dry run) ")) for line in result.stdout.splitlines()
            if line.startswith("(dry run) ")]


def test_up_creates_copies_prepares_starts_waits_fetches_and_deletes():
    commands = dry_run("up", "--name", "pr", "--zone", "europe-west4-a", "--spot", "--project", "p1",
                       "--data", "data/test.csv", "--stage", "finetune", "--delete", "lora.rank=8", "train.epochs=2")
    verbs = [c[4] for c in commands]
    assert verbs == ["create", "scp", "ssh", "scp", "ssh", "ssh",  # create, copy, unpack, data, setup, start
                     "describe", "ssh", "ssh",  # wait: the workers, each one's status, worker 0's log
                     "describe", "scp", "scp", "delete"]  # fetch the run and the logs, delete
    assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in commands)
    assert all("--zone=europe-west4-a" in c and "--project=p1" in c for c in commands)
    create = commands[0]
    assert create[5] == "pr" and "--accelerator-type=v3-32" in create and "--spot" in create
    assert "--version=tpu-ubuntu2204-base" in create
    assert commands[1][5:7] == ["--recurse", "--worker=all"] and commands[1][7].endswith("repo.tar.gz")
    assert commands[1][8] == "pr:~/"
    assert commands[3][6:8] == ["--worker=all", "data/test.csv"] and commands[3][8] == "pr:~/prompt-recovery/data/"
    assert "--command=cd prompt-recovery && bash scripts/setup_worker.sh" in commands[4]
    (start,) = [word for word in commands[5] if word.startswith("--command=")]
    assert "--worker=all" in commands[5]
    assert shlex.split(start.removeprefix("--command=")) == [
        "cd", "prompt-recovery", "&&", "bash", "scripts/pod_job.sh", "start", "configs/cloud_tpu_v3_32.yaml",
        "lora.rank=8 train.epochs=2", "finetune"]
    assert "--worker=0" in commands[7] and "--command=cd prompt-recovery && bash scripts/pod_job.sh status" in commands[7]
    fetch_run, fetch_log = commands[10], commands[11]
    assert "--worker=0" in fetch_run and fetch_run[7:9] == ["pr:prompt-recovery/runs/cloud_tpu_v3_32", "runs"]
    assert fetch_log[7:9] == ["pr:prompt-recovery/runs/pod-job/log", "runs/cloud_tpu_v3_32/pod-logs/worker-0.log"]
    assert commands[12][5:7] == ["pr", "--quiet"]


def test_all_runs_the_makefiles_stages():
    from pipeline.parallel.launch import stages_of

    makefile = (ROOT / "Makefile").read_text()
    (line,) = [line for line in makefile.splitlines() if line.startswith("ALL_STAGES :=")]
    assert stages_of("all") == line.split(":=")[1].split()


def test_single_steps_and_a_config_without_multi_host():
    (delete,) = dry_run("delete", "--name", "pr", "--zone", "z")
    assert delete[4:7] == ["delete", "pr", "--quiet"] and "--project" not in " ".join(delete)
    result = subprocess.run([sys.executable, "scripts/tpu_pod.py", "run", "--name", "pr", "--zone", "z",
                             "--config", "configs/kaggle_tpu_v3_8.yaml", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "does not set distribution.multi_host: true" in result.stderr


def test_archive_holds_the_tracked_files(tmp_path):
    archive = archive_repository(ROOT, tmp_path / "repo.tar.gz")
    with tarfile.open(archive) as f:
        names = set(f.getnames())
    assert {"Makefile", "pipeline/run/config.py", "requirements-tpu.txt"} <= names
    assert not any(n.startswith((".venv/", "artifacts/", "runs/")) for n in names)
