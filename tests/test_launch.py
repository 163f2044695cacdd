import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from processes import ROOT, bare_python

from pipeline.parallel.launch import archive_repository


# Credentials as `KAGGLE_USERNAME` and `KAGGLE_KEY` (the default preset is
# Gemma on Kaggle), in a home folder of their own.
def with_kaggle_credentials(home):
    return dict(os.environ, HOME=str(home), KAGGLE_USERNAME="someone", KAGGLE_KEY="0123abcd")


def dry_run(*args, env=None):
    result = subprocess.run(
        [sys.executable, "scripts/tpu_pod.py", *args, "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env or with_kaggle_credentials(ROOT / "runs"),
    )
    assert result.returncode == 0, result.stderr
    return [
        shlex.split(line.removeprefix("(dry run) "))
        for line in result.stdout.splitlines()
        if line.startswith("(dry run) ")
    ]


def test_up_creates_copies_prepares_starts_waits_fetches_and_deletes():
    commands = dry_run(
        "up",
        "--name",
        "pr",
        "--zone",
        "europe-west4-a",
        "--project",
        "p1",
        "--data",
        "data/test.csv",
        "--stage",
        "finetune",
        "--delete",
        "lora.rank=8",
        "train.epochs=2",
    )
    verbs = [c[4] for c in commands]
    assert verbs == [
        "create",
        "scp",
        "ssh",
        "scp",  # create, copy, unpack, data
        "scp",
        "ssh",  # the Kaggle credentials, into ~/.kaggle
        "ssh",
        "ssh",
        "ssh",  # setup, worker 0's preflight, start
        "describe",
        "ssh",
        "ssh",  # wait: the workers, each one's status, worker 0's log
        "describe",
        "scp",
        "scp",
        "delete",
    ]  # fetch the run and the logs, delete
    assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in commands)
    assert all("--zone=europe-west4-a" in c and "--project=p1" in c for c in commands)
    create = commands[0]
    assert create[5] == "pr" and "--accelerator-type=v3-32" in create and "--spot" not in create
    assert "--version=tpu-ubuntu2204-base" in create
    assert commands[1][5:7] == ["--recurse", "--worker=all"] and commands[1][7].endswith(
        "repo.tar.gz"
    )
    assert commands[1][8] == "pr:~/"
    assert (
        commands[3][6:8] == ["--worker=all", "data/test.csv"]
        and commands[3][8] == "pr:~/prompt-recovery/data/"
    )
    assert commands[4][7].endswith("/kaggle.json") and commands[4][6:9:2] == [
        "--worker=all",
        "pr:~/",
    ]
    assert (
        "--command=mkdir -p ~/.kaggle && chmod 700 ~/.kaggle && mv ~/kaggle.json "
        "~/.kaggle/kaggle.json && chmod 600 ~/.kaggle/kaggle.json" in commands[5]
    )
    assert "--command=cd prompt-recovery && bash scripts/setup_worker.sh" in commands[6]
    assert "--worker=0" in commands[7] and (
        "--command=cd prompt-recovery && make preflight CONFIG=configs/cloud_tpu_v3_32.yaml "
        "REQUIREMENTS=requirements-tpu.txt 'ARGS=lora.rank=8 train.epochs=2'" in commands[7]
    )
    commands = commands[:4] + commands[8:]  # as before the credentials and the preflight
    (start,) = [word for word in commands[4] if word.startswith("--command=")]
    assert "--worker=all" in commands[4]
    assert shlex.split(start.removeprefix("--command=")) == [
        "cd",
        "prompt-recovery",
        "&&",
        "bash",
        "scripts/pod_job.sh",
        "start",
        "configs/cloud_tpu_v3_32.yaml",
        "lora.rank=8 train.epochs=2",
        "finetune",
    ]
    assert (
        "--worker=0" in commands[6]
        and "--command=cd prompt-recovery && bash scripts/pod_job.sh status" in commands[6]
    )
    fetch_run, fetch_log = commands[9], commands[10]
    assert "--worker=0" in fetch_run and fetch_run[7:9] == [
        "pr:prompt-recovery/runs/cloud_tpu_v3_32",
        "runs",
    ]
    assert fetch_log[7:9] == [
        "pr:prompt-recovery/runs/pod-job/log",
        "runs/cloud_tpu_v3_32/pod-logs/worker-0.log",
    ]
    assert commands[11][5:7] == ["pr", "--quiet"]


def test_a_preset_from_kaggle_without_credentials_here_is_refused_before_the_slice_is_made(
    tmp_path,
):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    command = [sys.executable, "scripts/tpu_pod.py", "up", "--name=pr", "--zone=z", "--dry-run"]
    for preset in ("gemma_instruct_7b_en", "kaggle://keras/mistral/keras/mistral_instruct_7b_en/3"):
        result = subprocess.run(
            [*command, f"model.preset={preset}"],
            cwd=ROOT,
            env=dict(env, HOME=str(tmp_path)),
            capture_output=True,
            text=True,
        )
        assert result.returncode != 0 and "create" not in result.stdout
        assert f"model.preset {preset} is downloaded from Kaggle on every worker" in result.stderr
        assert "~/.kaggle/kaggle.json" in result.stderr and "gs://BUCKET/PRESET" in result.stderr
    # A preset on a bucket needs none, and none is copied.
    commands = dry_run(
        "up",
        "--name=pr",
        "--zone=z",
        "model.preset=gs://b/gemma",
        env=dict(env, HOME=str(tmp_path)),
    )
    assert commands[0][4] == "create" and not any(".kaggle" in " ".join(c) for c in commands)


def test_the_credentials_kagglehub_would_use_are_the_ones_found(tmp_path):
    from pipeline.parallel.kaggle_credentials import downloads_from_kaggle, find_credentials

    assert find_credentials({}, tmp_path) is None
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text('{"username": "a", "key": "k1"}')
    found = find_credentials({}, tmp_path)
    assert (found.file_name, found.content) == ("kaggle.json", '{"username": "a", "key": "k1"}')
    env = {"KAGGLE_USERNAME": "b", "KAGGLE_KEY": "k2"}
    assert find_credentials(env, tmp_path).content == '{"username": "b", "key": "k2"}'
    (tmp_path / ".kaggle" / "access_token").write_text("token-1\n")
    assert find_credentials(env, tmp_path).content == "token-1"
    found = find_credentials(dict(env, KAGGLE_API_TOKEN="token-2"), tmp_path)
    assert (found.file_name, found.content, found.source) == (
        "access_token",
        "token-2",
        "KAGGLE_API_TOKEN",
    )
    written = found.write_into(tmp_path)
    assert written.read_text() == "token-2" and written.stat().st_mode & 0o777 == 0o600
    assert downloads_from_kaggle("gemma_instruct_7b_en")
    assert downloads_from_kaggle("kaggle://google/gemma/keras/gemma_7b_en/3")
    for elsewhere in ("gs://b/gemma", "hf://google/gemma-7b", "data/gemma_tiny", "/kaggle/input/x"):
        assert not downloads_from_kaggle(elsewhere)


def test_a_spot_slice_is_a_queued_resource_waited_for_and_deleted_with_its_node():
    commands = dry_run(
        "up",
        "--name",
        "pr",
        "--zone",
        "z",
        "--spot",
        "--retries",
        "2",
        "--stage",
        "finetune",
        "--delete",
        "run.root=gs://b/runs",
    )
    groups_and_verbs = [tuple(c[3:5]) for c in commands]
    assert groups_and_verbs[:2] == [
        ("queued-resources", "create"),
        ("queued-resources", "describe"),
    ]
    assert groups_and_verbs[-1] == ("queued-resources", "delete")
    assert all(group == "tpu-vm" for group, _ in groups_and_verbs[2:-1])
    create = commands[0]
    assert create[5] == "pr" and "--node-id=pr" in create and "--spot" in create
    assert (
        "--runtime-version=tpu-ubuntu2204-base" in create and "--accelerator-type=v3-32" in create
    )
    assert "--force" in commands[-1] and "--quiet" in commands[-1]


def test_retries_need_a_run_on_a_bucket():
    result = subprocess.run(
        [
            sys.executable,
            "scripts/tpu_pod.py",
            "up",
            "--name",
            "pr",
            "--zone",
            "z",
            "--spot",
            "--retries",
            "1",
            "--dry-run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "--retries needs run.root on a bucket" in result.stderr


def test_the_worker_job_tells_a_preempted_stage_from_a_failed_one(tmp_path):
    """pod_job.sh under make, whose own exit code is 2 either way: a recipe
    exiting with PREEMPTED_EXIT_CODE is `preempted`, another code `failed`."""
    from pipeline.parallel.launch import WorkerStatus
    from pipeline.parallel.preemption import PREEMPTED_EXIT_CODE

    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "pod_job.sh", tmp_path / "scripts")
    (tmp_path / "Makefile").write_text(
        f"finetune:\n\texit {PREEMPTED_EXIT_CODE}\ndata:\n\texit 3\n"
    )
    env = dict(os.environ, TPU_WORKER_ID="0")
    for stage, state, code in [
        ("finetune", "preempted", PREEMPTED_EXIT_CODE),
        ("data", "failed", 2),
    ]:
        subprocess.run(
            ["bash", "scripts/pod_job.sh", "start", "c.yaml", "", stage],
            cwd=tmp_path,
            env=env,
            check=True,
        )
        deadline = time.time() + 60
        while (
            line := subprocess.run(
                ["bash", "scripts/pod_job.sh", "status"],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
            ).stdout.strip()
        ).startswith("worker 0: running"):
            assert time.time() < deadline
            time.sleep(0.1)
        status = WorkerStatus.parse(line)
        assert (status.state, status.stage, status.exit_code) == (state, stage, code), line


def test_all_runs_the_makefiles_stages():
    from pipeline.parallel.launch import stages_of

    makefile = (ROOT / "Makefile").read_text()
    (line,) = [line for line in makefile.splitlines() if line.startswith("ALL_STAGES :=")]
    assert stages_of("all") == line.split(":=")[1].split()


def test_single_steps_and_a_config_without_multi_host():
    (delete,) = dry_run("delete", "--name", "pr", "--zone", "z")
    assert delete[4:7] == ["delete", "pr", "--quiet"] and "--project" not in " ".join(delete)
    result = subprocess.run(
        [
            sys.executable,
            "scripts/tpu_pod.py",
            "run",
            "--name",
            "pr",
            "--zone",
            "z",
            "--config",
            "configs/kaggle_tpu_v3_8.yaml",
            "--dry-run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "does not set distribution.multi_host: true" in result.stderr


def test_archive_holds_the_tracked_files(tmp_path):
    archive = archive_repository(ROOT, tmp_path / "repo.tar.gz")
    with tarfile.open(archive) as f:
        names = set(f.getnames())
    assert {"Makefile", "pipeline/run/config.py", "requirements-tpu.txt"} <= names
    assert not any(n.startswith((".venv/", "artifacts/", "runs/")) for n in names)


@pytest.fixture
def standin_cloud(tmp_path, monkeypatch):
    """The stand-in gcloud first on PATH, and a repository of two files for
    its workers: pod_job.sh and a Makefile whose `data` target waits until
    the test lets it end (it marks that it is waiting)."""
    monkeypatch.setenv("PATH", f"{ROOT / 'tests' / 'standins'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_GCLOUD_ROOT", str(tmp_path / "slices"))
    monkeypatch.setenv("STANDIN_GCLOUD_PYTHON", sys.executable)
    monkeypatch.setenv("STAGE_MAY_END", str(tmp_path / "may-end"))
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "pod_job.sh", repo / "scripts")
    (repo / "Makefile").write_text(
        "data:\n\ttest -f $(STAGE_MAY_END) || (touch $(STAGE_MAY_END).waiting; sleep 600)\n"
    )
    return tmp_path, [repo / "scripts", repo / "Makefile"]


def run_preempted_once(folder, files, retries):
    """`Launcher.up` of a spot slice whose stage Cloud TPU (the stand-in's
    preempt) takes back while it runs; returns (what up raised or None,
    what the launcher said)."""
    import threading

    from pipeline.parallel.launch import Launcher, PodError, TpuPod

    pod = TpuPod("spot", "standin-a", spot=True)
    said = []
    launcher = Launcher(pod, log=said.append)

    def take_back():
        deadline = time.time() + 120
        while not (
            Path(f"{os.environ['STAGE_MAY_END']}.waiting").exists()
            and "pod: worker 1: running data" in said
        ):
            assert time.time() < deadline
            time.sleep(0.05)
        Path(os.environ["STAGE_MAY_END"]).touch()  # the next slice's stage ends at once
        subprocess.run(
            [
                "gcloud",
                "compute",
                "tpus",
                "queued-resources",
                "preempt",
                "spot",
                "--zone=standin-a",
            ],
            check=True,
        )

    preempting = threading.Thread(target=take_back)
    preempting.start()
    raised = None
    try:
        with launcher.deleting(True):
            launcher.up(
                [pod.copy_to_workers(files, "~/prompt-recovery/")],
                lambda stages: pod.start(stages, "c.yaml", []),
                ["data"],
                0.2,
                lambda: launcher.wait(0.2),
                retries,
            )
    except PodError as error:
        raised = error
    preempting.join()
    assert (
        not (folder / "slices" / "spot").exists()
        and not (folder / "slices" / "queued" / "spot.json").exists()
    )
    return raised, "\n".join(said)


def test_a_preempted_spot_slice_is_requested_again_and_its_stage_started_again(standin_cloud):
    folder, files = standin_cloud
    raised, said = run_preempted_once(folder, files, retries=1)
    assert raised is None, said
    assert re.search(
        r"pod: the slice was preempted during data \(SUSPEND(ING|ED)\); preemption 1: deleting the "
        r"slice",
        said,
    )
    assert said.count("queued-resources create spot") == 2 and "pod: worker 0: done" in said
    assert "pod: 1 preemption(s): preempted during data\n" in said


def test_a_preemption_past_the_retries_ends_up_saying_what_to_do(standin_cloud):
    folder, files = standin_cloud
    raised, said = run_preempted_once(folder, files, retries=0)
    assert raised is not None and said.count("queued-resources create spot") == 1
    assert re.match(
        r"the slice was preempted during data \(SUSPEND(ING|ED)\); --retries 0 used up: run `up` "
        r"again "
        "with the same arguments",
        str(raised),
    ), str(raised)


def scripted_launcher(statuses=()):
    """A `Launcher` whose slice answers from a script (the workers' status
    lines; the slice ACTIVE): the choices of `wait` and `up` run as they
    are, and no gcloud is called."""
    from pipeline.parallel.launch import Launcher, TpuPod, WorkerStatus

    class Scripted(Launcher):
        def workers(self):
            return [0, 1]

        def statuses(self, workers=None):
            return [WorkerStatus.parse(line) for line in statuses]

        def output(self, command):
            return ""

        def slice_state(self):
            return "ACTIVE"

        def execute(self, commands, tolerate=False):
            pass

    return Scripted(TpuPod("s", "z", spot=True), log=lambda *_: None)


def test_the_first_worker_to_fail_is_named():
    """Worker 1 failed first (time 100); worker 0 failed after it, maybe
    because of it."""
    from pipeline.parallel.launch import PodError

    launcher = scripted_launcher(
        ["worker 0: failed finetune 2 250.5", "worker 1: failed data 2 100.0"]
    )
    with pytest.raises(PodError, match=r"stage data failed on worker 1 \(make exited 2\)"):
        launcher.wait(0)


def test_a_relaunch_starts_again_at_the_interrupted_stage():
    from pipeline.parallel.launch import SlicePreempted

    launcher = scripted_launcher()
    started, finished = [], []

    def finish():
        finished.append(True)
        if len(finished) == 1:
            raise SlicePreempted("finetune", "SUSPENDED")

    launcher.up([], started.append, ["data", "finetune", "mean-prompt", "predict"], 0, finish, 1)
    assert started == [
        ["data", "finetune", "mean-prompt", "predict"],
        ["finetune", "mean-prompt", "predict"],
    ]


@pytest.mark.parametrize(
    "accelerator_type, said",
    [
        ("v3-32", "v3-32: 32 devices on 4 host(s), runtime tpu-ubuntu2204-base; mesh [4, 8]"),
        ("v4-32", "v4-32: 16 devices on 4 host(s), runtime tpu-ubuntu2204-base; mesh [4,4]"),
        ("v5litepod-16", "16 devices on 4 host(s), runtime v2-alpha-tpuv5-lite; mesh [4,4]"),
        ("v6e-16", "v6e-16: 16 devices on 4 host(s), runtime v2-alpha-tpuv6e; mesh [4,4]"),
    ],
)
def test_the_launcher_runs_on_a_fresh_clones_bare_python3(tmp_path, accelerator_type, said):
    """`python3 scripts/tpu_pod.py` and `make tpu-pod`, as the README shows
    them, with a bare Python 3.10 as `python3`, before any `make install`."""
    clone = tmp_path / "clone"
    with tarfile.open(archive_repository(ROOT, tmp_path / "repo.tar.gz")) as archive:
        archive.extractall(clone, filter="data")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").symlink_to(bare_python())
    env = dict(with_kaggle_credentials(tmp_path), PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin")
    options = f"up --name pr --zone z --accelerator-type {accelerator_type} --data data/test.csv"
    for command in (
        ["python3", "scripts/tpu_pod.py", *options.split(), "--dry-run"],
        ["make", "tpu-pod", f"POD={options} --dry-run"],
    ):
        done = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert said in done.stdout and f"--accelerator-type={accelerator_type}" in done.stdout
    assert not (clone / ".venv").exists()
