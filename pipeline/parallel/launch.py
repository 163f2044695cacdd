"""Cloud TPU slices from this machine: the gcloud commands of a pod run.

A run on a TPU VM slice is: create the slice, copy the repository and the
data to every worker, prepare each worker (`scripts/setup_worker.sh`: a
Python the pinned JAX supports, then `make install`), start the stages on
every worker detached from the ssh session (`scripts/pod_job.sh`: each
worker logs to `runs/pod-job/log` and records each stage's exit status), wait
for them while printing worker 0's progress, copy the run folder back from
worker 0 (the only writer) and every worker's log, and delete the slice when
asked, also after a failure. A dropped connection stops only the waiting:
`status`, `logs`, `wait` and `fetch` pick the run up again.

Each step is one gcloud command, built here as an argument list, so that
`--dry-run` prints exactly what would run.

Example:
```python
pod = TpuPod(name="prompts", zone="europe-west4-a", accelerator_type="v3-32")
for command in pod.setup(repo_archive, ["data/test.csv"]):
    print(shlex.join(command))
```
"""

import contextlib
import dataclasses
import io
import json
import shlex
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Optional

REMOTE_REPO = "prompt-recovery"  # in each worker's home folder
JOB_LOG = "runs/pod-job/log"  # each worker's log, in the repository (scripts/pod_job.sh)
ALL_STAGES = ["data", "finetune", "mean-prompt", "predict", "evaluate"]  # the Makefile's `all`


class PodError(RuntimeError):
    """A step of a pod run failed; the message says which and what to do."""


@dataclasses.dataclass
class WorkerStatus:
    """One line of `pod_job.sh status`: worker N: STATE [STAGE [CODE TIME]]."""

    worker: str
    state: str  # none, running, done, failed, stopped
    stage: str = ""
    exit_code: Optional[int] = None
    failed_at: Optional[float] = None  # seconds since 1970

    @classmethod
    def parse(cls, line):
        name, _, rest = line.partition(":")
        words = rest.split()
        if not name.startswith("worker ") or not words:
            raise PodError(f"unexpected status line from a worker: {line!r}")
        code = int(words[2]) if len(words) > 2 else None
        failed_at = float(words[3]) if len(words) > 3 else None
        return cls(name.removeprefix("worker "), words[0], words[1] if len(words) > 1 else "", code, failed_at)

    def __str__(self):
        return f"worker {self.worker}: {' '.join(str(w) for w in (self.state, self.stage, self.exit_code) if w not in ('', None))}"


@dataclasses.dataclass
class TpuPod:
    name: str
    zone: str
    accelerator_type: str = "v3-32"
    runtime_version: str = "tpu-ubuntu2204-base"
    spot: bool = False
    project: Optional[str] = None

    def _gcloud(self, *words):
        command = ["gcloud", "compute", "tpus", "tpu-vm", *words, f"--zone={self.zone}"]
        return command + ([f"--project={self.project}"] if self.project else [])

    def create(self):
        command = self._gcloud("create", self.name, f"--accelerator-type={self.accelerator_type}",
                               f"--version={self.runtime_version}")
        return command + (["--spot"] if self.spot else [])

    def describe(self):
        return self._gcloud("describe", self.name, "--format=json")

    def ssh(self, remote_command, worker="all"):
        return self._gcloud("ssh", self.name, f"--worker={worker}", f"--command={remote_command}")

    def copy_to_workers(self, local_paths, remote_dir):
        return self._gcloud("scp", "--recurse", "--worker=all", *map(str, local_paths), f"{self.name}:{remote_dir}")

    def copy_from_worker(self, remote_path, local_path, worker=0):
        return self._gcloud("scp", "--recurse", f"--worker={worker}", f"{self.name}:{remote_path}", str(local_path))

    def delete(self):
        return self._gcloud("delete", self.name, "--quiet")

    def setup(self, repo_archive, data_paths):
        """Repository (an archive from `archive_repository`) and data on every
        worker, then each worker prepared (Python, requirements)."""
        unpack = (f"mkdir -p {REMOTE_REPO}/data && tar -xzf {Path(repo_archive).name} -C {REMOTE_REPO} "
                  f"&& rm {Path(repo_archive).name}")
        commands = [self.copy_to_workers([repo_archive], "~/"), self.ssh(unpack)]
        if data_paths:
            commands.append(self.copy_to_workers(data_paths, f"~/{REMOTE_REPO}/data/"))
        commands.append(self.ssh(f"cd {REMOTE_REPO} && bash scripts/setup_worker.sh"))
        return commands

    def start(self, stages, config, overrides):
        """Starts the stages on every worker, detached; returns at once."""
        words = ["bash", "scripts/pod_job.sh", "start", config, " ".join(overrides), *stages]
        return self.ssh(f"cd {REMOTE_REPO} && {shlex.join(words)}")

    def job_status(self, worker):
        return self.ssh(f"cd {REMOTE_REPO} && bash scripts/pod_job.sh status", worker=worker)

    def job_log(self, worker, lines):
        return self.ssh(f"cd {REMOTE_REPO} && bash scripts/pod_job.sh logs {int(lines)}", worker=worker)

    def fetch(self, remote_run_dir, local_root, workers):
        """Worker 0's run folder, and every worker's log beside it
        (`<run>/pod-logs/worker-<i>.log`); only the logs when the run
        folder is on a bucket (the stages put it there)."""
        run = Path(local_root) / Path(remote_run_dir).name
        on_bucket = str(remote_run_dir).startswith("gs://")
        commands = [] if on_bucket else [self.copy_from_worker(f"{REMOTE_REPO}/{remote_run_dir}", local_root)]
        return commands + [self.copy_from_worker(f"{REMOTE_REPO}/{JOB_LOG}", log_path(run, w), worker=w)
                           for w in workers]


def log_path(local_run_dir, worker):
    return Path(local_run_dir) / "pod-logs" / f"worker-{worker}.log"


def stages_of(target):
    """The stages a target runs on the workers (`all`: the Makefile's)."""
    return list(ALL_STAGES) if target == "all" else [target]


def archive_repository(repo_root, archive_path):
    """The files git tracks, as they are in the working tree, in a .tar.gz."""
    repo_root = Path(repo_root)
    names = subprocess.run(["git", "ls-files", "-z"], cwd=repo_root, capture_output=True, check=True).stdout
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in filter(None, names.decode().split("\0")):
            if (repo_root / name).is_file():
                archive.add(repo_root / name, arcname=name)
    Path(archive_path).write_bytes(buffer.getvalue())
    return archive_path


class Launcher:
    """Runs a pod's gcloud commands; with dry_run, prints them instead (a
    dry run counts one worker and waits for nothing)."""

    def __init__(self, pod, dry_run=False, log=print):
        self.pod = pod
        self.dry_run = dry_run
        self.log = log

    def execute(self, commands, tolerate=False):
        """Runs the commands in order; a failure raises PodError (with
        tolerate: is printed, and the next command runs)."""
        for command in commands:
            self.log(("(dry run) " if self.dry_run else "+ ") + shlex.join(command))
            if not self.dry_run and subprocess.run(command).returncode != 0:
                if not tolerate:
                    raise PodError(f"this command failed: {shlex.join(command)}")
                self.log(f"pod: this command failed, going on: {shlex.join(command)}")

    def output(self, command):
        if self.dry_run:
            self.log("(dry run) " + shlex.join(command))
            return ""
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise PodError(f"{shlex.join(command)} failed: {result.stderr.strip()[-2000:]}")
        return result.stdout

    def workers(self):
        """The slice's worker numbers, from `gcloud ... describe`."""
        described = self.output(self.pod.describe())
        return list(range(len(json.loads(described).get("networkEndpoints", [])))) if described else [0]

    def statuses(self, workers=None):
        found = []
        for worker in self.workers() if workers is None else workers:
            lines = [line for line in self.output(self.pod.job_status(worker)).splitlines() if line.startswith("worker ")]
            found.append(WorkerStatus.parse(lines[-1]) if lines else WorkerStatus(str(worker), "unknown"))
        return found

    def wait(self, poll_seconds, progress_lines=3):
        """Polls every worker until the job ends; prints state changes and
        worker 0's newest log lines. Raises PodError naming the stage and
        worker of a failure."""
        seen, last_lines, workers = {}, [], self.workers()
        while True:
            statuses = self.statuses(workers)
            if self.dry_run:
                self.output(self.pod.job_log(0, progress_lines))
                return statuses
            for status in statuses:
                if seen.get(status.worker) != str(status):
                    self.log(f"pod: {status}")
                    seen[status.worker] = str(status)
            lines = self.output(self.pod.job_log(0, progress_lines)).splitlines()
            for line in lines[len(_overlap(last_lines, lines)):]:
                self.log(f"pod: worker 0 | {line}")
            last_lines = lines
            broken = [s for s in statuses if s.state not in ("running", "done")]
            if broken:
                # The first to fail: the others may have failed because it did.
                first = min(broken, key=lambda s: s.failed_at if s.failed_at is not None else float("inf"))
                if first.state == "failed":
                    raise PodError(f"stage {first.stage} failed on worker {first.worker} (make exited {first.exit_code})")
                during = f" during {first.stage}" if first.stage else ""
                raise PodError(f"the job on worker {first.worker} is {first.state}{during}")
            if all(s.state == "done" for s in statuses):
                return statuses
            time.sleep(poll_seconds)

    def fetch(self, remote_run_dir, local_root, tolerate=False):
        """Worker 0's run folder and every worker's log."""
        workers = self.workers()
        local_run = Path(local_root) / Path(remote_run_dir).name
        if not self.dry_run:
            log_path(local_run, 0).parent.mkdir(parents=True, exist_ok=True)
        self.execute(self.pod.fetch(remote_run_dir, local_root, workers), tolerate=tolerate)
        return local_run

    def finish(self, remote_run_dir, local_root, poll_seconds):
        """Waits for the job, then fetches the run folder and the logs; on a
        failure fetches what there is and raises PodError saying where the
        logs are."""
        try:
            self.wait(poll_seconds)
        except PodError as error:
            self.log(f"pod: {error}; fetching what there is")
            local_run = self.fetch(remote_run_dir, local_root, tolerate=True)
            raise PodError(f"{error}; the workers' logs are in {log_path(local_run, 'N').parent}/") from None
        local_run = self.fetch(remote_run_dir, local_root)
        if not self.dry_run:
            self.log(f"pod: done; the run folder and the workers' logs are in {local_run}")

    @contextlib.contextmanager
    def deleting(self, delete):
        """Deletes the slice on the way out when asked, whatever happened
        inside (a slice left behind goes on billing)."""
        try:
            yield self
        finally:
            if delete:
                self.execute([self.pod.delete()])


def _overlap(old, new):
    """The lines of `new` already printed: the longest tail of `old` that
    `new` starts with."""
    for start in range(len(old)):
        if new[: len(old) - start] == old[start:]:
            return old[start:]
    return []
