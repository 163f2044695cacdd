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

A spot slice is requested as a queued resource (Cloud TPU's way to ask for
spot capacity and to ask again), and waited for until it is ACTIVE. When
Cloud TPU takes it back, the workers get SIGTERM (the stages save and exit
with PREEMPTED_EXIT_CODE), the queued resource goes SUSPENDING, then
SUSPENDED with the workers' disks gone: `wait` raises `SlicePreempted`,
and `Launcher.up`, given retries, deletes the request and makes the slice
again, for a run whose outputs are on a bucket to resume there.

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
import re
import shlex
import subprocess
import tarfile
import time
from pathlib import Path

REMOTE_REPO = "prompt-recovery"  # in each worker's home folder
JOB_LOG = "runs/pod-job/log"  # each worker's log, in the repository (scripts/pod_job.sh)
ALL_STAGES = ["data", "finetune", "mean-prompt", "predict", "evaluate"]  # the Makefile's `all`


PREEMPTED_STATES = ("SUSPENDING", "SUSPENDED", "PREEMPTED")  # a queued resource's, a node's
STEP_LINE = re.compile(r"finetune: step (\d+)/")
RESUMED_LINE = re.compile(r"finetune: resuming from .* at step (\d+)/")


class PodError(RuntimeError):
    """A step of a pod run failed; the message says which and what to do."""


class SlicePreempted(PodError):
    """Cloud TPU took the slice back (or its stages saved at a preemption
    notice) during `stage`."""

    def __init__(self, stage, state):
        super().__init__(
            "the slice was preempted "
            f"{f'during {stage}' if stage else 'before a stage was seen running'} "
            f"({state})"
        )
        self.stage = stage


@dataclasses.dataclass
class WorkerStatus:
    """One line of `pod_job.sh status`: worker N: STATE [STAGE [CODE TIME]]."""

    worker: str
    state: str  # none, running, done, failed, preempted, stopped
    stage: str = ""
    exit_code: int | None = None
    failed_at: float | None = None  # seconds since 1970

    @classmethod
    def parse(cls, line):
        name, _, rest = line.partition(":")
        words = rest.split()
        if not name.startswith("worker ") or not words:
            raise PodError(f"unexpected status line from a worker: {line!r}")
        code = int(words[2]) if len(words) > 2 else None
        failed_at = float(words[3]) if len(words) > 3 else None
        return cls(
            name.removeprefix("worker "),
            words[0],
            words[1] if len(words) > 1 else "",
            code,
            failed_at,
        )

    def __str__(self):
        fields = (self.state, self.stage, self.exit_code)
        return f"worker {self.worker}: {' '.join(str(w) for w in fields if w not in ('', None))}"


@dataclasses.dataclass
class TpuPod:
    name: str
    zone: str
    accelerator_type: str = "v3-32"
    runtime_version: str = "tpu-ubuntu2204-base"
    spot: bool = False
    project: str | None = None

    def _gcloud(self, *words, group="tpu-vm"):
        command = ["gcloud", "compute", "tpus", group, *words, f"--zone={self.zone}"]
        return command + ([f"--project={self.project}"] if self.project else [])

    def create(self):
        """A spot slice is a queued resource of the same name as its node."""
        if self.spot:
            return self._gcloud(
                "create",
                self.name,
                f"--node-id={self.name}",
                f"--accelerator-type={self.accelerator_type}",
                f"--runtime-version={self.runtime_version}",
                "--spot",
                group="queued-resources",
            )
        return self._gcloud(
            "create",
            self.name,
            f"--accelerator-type={self.accelerator_type}",
            f"--version={self.runtime_version}",
        )

    def describe(self):
        return self._gcloud("describe", self.name, "--format=json")

    def describe_request(self):
        """The queued resource of a spot slice, whose state says whether the
        slice is there (ACTIVE) or was taken back (SUSPENDING, SUSPENDED)."""
        return self._gcloud("describe", self.name, "--format=json", group="queued-resources")

    def ssh(self, remote_command, worker="all"):
        return self._gcloud("ssh", self.name, f"--worker={worker}", f"--command={remote_command}")

    def copy_to_workers(self, local_paths, remote_dir):
        return self._gcloud(
            "scp", "--recurse", "--worker=all", *map(str, local_paths), f"{self.name}:{remote_dir}"
        )

    def copy_from_worker(self, remote_path, local_path, worker=0):
        return self._gcloud(
            "scp", "--recurse", f"--worker={worker}", f"{self.name}:{remote_path}", str(local_path)
        )

    def delete(self):
        """A spot slice: the queued resource, with its node (--force)."""
        if self.spot:
            return self._gcloud("delete", self.name, "--force", "--quiet", group="queued-resources")
        return self._gcloud("delete", self.name, "--quiet")

    def setup(self, repo_archive, data_paths, config, overrides, credentials=None):
        """Repository (an archive from `archive_repository`) and data on every
        worker, the Kaggle credentials file (when given) in `~/.kaggle/`
        readable by the owner only, then each worker prepared (`make`, a
        Python, the requirements), then worker 0's preflight (can it read
        the preset and the encoder and write the run?) before any stage."""
        unpack = (
            f"mkdir -p {REMOTE_REPO}/data && tar -xzf {Path(repo_archive).name} -C {REMOTE_REPO} "
            f"&& rm {Path(repo_archive).name}"
        )
        commands = [self.copy_to_workers([repo_archive], "~/"), self.ssh(unpack)]
        if data_paths:
            commands.append(self.copy_to_workers(data_paths, f"~/{REMOTE_REPO}/data/"))
        if credentials:
            name = Path(credentials).name
            commands += [
                self.copy_to_workers([credentials], "~/"),
                self.ssh(
                    f"mkdir -p ~/.kaggle && chmod 700 ~/.kaggle && mv ~/{name} ~/.kaggle/{name} "
                    f"&& chmod 600 ~/.kaggle/{name}"
                ),
            ]
        commands.append(self.ssh(f"cd {REMOTE_REPO} && bash scripts/setup_worker.sh"))
        return commands + [self.ssh(self._make_on_worker("preflight", config, overrides), worker=0)]

    def _make_on_worker(self, target, config, overrides):
        words = [
            "make",
            target,
            f"CONFIG={config}",
            "REQUIREMENTS=requirements-tpu.txt",
            f"ARGS={' '.join(overrides)}",
        ]
        return f"cd {REMOTE_REPO} && {shlex.join(words)}"

    def start(self, stages, config, overrides):
        """Starts the stages on every worker, detached; returns at once."""
        words = ["bash", "scripts/pod_job.sh", "start", config, " ".join(overrides), *stages]
        return self.ssh(f"cd {REMOTE_REPO} && {shlex.join(words)}")

    def job_status(self, worker):
        return self.ssh(f"cd {REMOTE_REPO} && bash scripts/pod_job.sh status", worker=worker)

    def job_log(self, worker, lines):
        return self.ssh(
            f"cd {REMOTE_REPO} && bash scripts/pod_job.sh logs {int(lines)}", worker=worker
        )

    def fetch(self, remote_run_dir, local_root, workers):
        """Worker 0's run folder, and every worker's log beside it
        (`<run>/pod-logs/worker-<i>.log`); only the logs when the run
        folder is on a bucket (the stages put it there)."""
        run = Path(local_root) / Path(remote_run_dir).name
        on_bucket = str(remote_run_dir).startswith("gs://")
        commands = (
            []
            if on_bucket
            else [self.copy_from_worker(f"{REMOTE_REPO}/{remote_run_dir}", local_root)]
        )
        return commands + [
            self.copy_from_worker(f"{REMOTE_REPO}/{JOB_LOG}", log_path(run, w), worker=w)
            for w in workers
        ]


@dataclasses.dataclass
class Preemption:
    """A slice taken back during `stage`; for finetune, the step worker 0's
    log showed last and the step the next slice resumed at."""

    stage: str
    step_reached: int | None = None
    resumed_at: int | None = None

    def __str__(self):
        said = (
            f"preempted during {self.stage}"
            if self.stage
            else "preempted before a stage was seen running"
        )
        if self.stage != "finetune" or self.resumed_at is None:
            return said
        if self.step_reached is None:
            return f"{said} before its first step line; resumed at step {self.resumed_at}"
        lost = max(0, self.step_reached - self.resumed_at)
        return (
            f"{said} at step {self.step_reached} (the last that worker 0's log showed), resumed at "
            "step "
            f"{self.resumed_at}: {lost} step(s) lost"
        )


def log_path(local_run_dir, worker):
    return Path(local_run_dir) / "pod-logs" / f"worker-{worker}.log"


def stages_of(target):
    """The stages a target runs on the workers (`all`: the Makefile's)."""
    return list(ALL_STAGES) if target == "all" else [target]


def archive_repository(repo_root, archive_path):
    """The files git tracks, as they are in the working tree, in a .tar.gz."""
    repo_root = Path(repo_root)
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=repo_root, capture_output=True, check=True
    ).stdout
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
        self.stage = ""  # the stage the workers were last seen running
        self.step_reached = None  # the newest finetune step in worker 0's log
        self.preemptions = []  # Preemption, one per slice taken back
        self.slice_exists = None  # None: not known (made by an earlier command)

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
        return (
            list(range(len(json.loads(described).get("networkEndpoints", []))))
            if described
            else [0]
        )

    def statuses(self, workers=None):
        found = []
        for worker in self.workers() if workers is None else workers:
            lines = [
                line
                for line in self.output(self.pod.job_status(worker)).splitlines()
                if line.startswith("worker ")
            ]
            found.append(
                WorkerStatus.parse(lines[-1]) if lines else WorkerStatus(str(worker), "unknown")
            )
        return found

    def slice_state(self):
        """The queued resource's state for a spot slice, the node's
        otherwise; None when gcloud cannot describe it."""
        try:
            described = json.loads(
                self.output(self.pod.describe_request() if self.pod.spot else self.pod.describe())
                or "{}"
            )
        except PodError:
            return None
        state = described.get("state", "")
        return state.get("state", "") if isinstance(state, dict) else state

    def wait_ready(self, poll_seconds):
        """Waits for a spot slice's queued resource to be ACTIVE (it may wait
        for capacity); a plain `create` returns with the slice READY."""
        seen = None
        while self.pod.spot:
            state = self.slice_state()
            if self.dry_run or state == "ACTIVE":
                return
            if state != seen:
                self.log(f"pod: the queued resource {self.pod.name} is {state}")
                seen = state
            if state in (None, "FAILED", *PREEMPTED_STATES):
                raise PodError(
                    f"the queued resource {self.pod.name} is {state}; see `gcloud compute tpus "
                    f"queued-resources describe {self.pod.name} --zone={self.pod.zone}`"
                )
            time.sleep(poll_seconds)

    def wait(self, poll_seconds, progress_lines=10):
        """Polls every worker until the job ends; prints state changes and
        worker 0's newest log lines. Raises SlicePreempted when the slice is
        taken back (or its stages saved at a preemption notice), PodError
        naming the stage and worker of a failure."""
        seen, last_lines, workers = {}, [], None
        while True:
            try:
                workers = self.workers() if workers is None else workers
                statuses = self.statuses(workers)
                lines = self.output(self.pod.job_log(0, progress_lines)).splitlines()
            except PodError:
                self._raise_if_preempted("")
                raise
            if self.dry_run:
                return statuses
            for status in statuses:
                if seen.get(status.worker) != str(status):
                    self.log(f"pod: {status}")
                    seen[status.worker] = str(status)
                self.stage = status.stage if status.state == "running" else self.stage
            for line in lines[len(_overlap(last_lines, lines)) :]:
                self.log(f"pod: worker 0 | {line}")
                self._follow(line)
            last_lines = lines
            broken = [s for s in statuses if s.state not in ("running", "done")]
            # A preempted host's peers are saving the same step: let them finish.
            if broken and not (
                all(s.state == "preempted" for s in broken)
                and any(s.state == "running" for s in statuses)
            ):
                # The first to fail: the others may have failed because it did.
                first = min(
                    broken, key=lambda s: s.failed_at if s.failed_at is not None else float("inf")
                )
                if any(s.state == "preempted" for s in broken):
                    raise SlicePreempted(
                        first.stage, "exit code 75: the stages saved at a preemption notice"
                    )
                self._raise_if_preempted(first.stage)
                if first.state == "failed":
                    raise PodError(
                        f"stage {first.stage} failed on worker {first.worker} (make exited "
                        f"{first.exit_code})"
                    )
                during = f" during {first.stage}" if first.stage else ""
                raise PodError(f"the job on worker {first.worker} is {first.state}{during}")
            if all(s.state == "done" for s in statuses):
                return statuses
            time.sleep(poll_seconds)

    def _raise_if_preempted(self, stage):
        preempted = self._preempted(stage)
        if preempted:
            raise preempted from None

    def _preempted(self, stage):
        state = self.slice_state()
        return SlicePreempted(stage or self.stage, state) if state in PREEMPTED_STATES else None

    def _follow(self, line):
        """Keeps the step finetune reached, and reports what a preemption
        cost once the stage resumes (or starts over)."""
        resumed, step = RESUMED_LINE.search(line), STEP_LINE.search(line)
        pending = [p for p in self.preemptions if p.stage == "finetune" and p.resumed_at is None]
        if pending and (resumed or step):
            pending[-1].resumed_at = int(resumed.group(1)) if resumed else 0
            self.log(f"pod: {pending[-1]}")
        if step:
            self.step_reached = int(step.group(1))

    def up(self, setup, start, stages, poll_seconds, finish, retries=0):
        """Creates the slice, sets it up and starts `start(stages)`, then
        `finish()`. When the slice is preempted and `retries` allow, deletes
        it, makes it again and starts again from the stage it was taken
        during (the stages resume from what the bucket holds)."""
        while True:
            self.create()
            try:
                self.wait_ready(poll_seconds)
                self.execute([*setup, start(stages)])
                finish()
                break
            except PodError as error:
                preempted = (
                    error if isinstance(error, SlicePreempted) else self._preempted(stages[0])
                )
                if preempted is None:
                    raise
                while (
                    self.slice_state() == "SUSPENDING"
                ):  # the stages' notice time: a delete would cut their save
                    time.sleep(1)
                if len(self.preemptions) >= retries:
                    raise PodError(
                        f"{preempted}; --retries {retries} used up: run `up` again with the same "
                        "arguments to go on from what the run folder holds"
                    ) from None
                reached = self.step_reached if preempted.stage == "finetune" else None
                self.preemptions.append(Preemption(preempted.stage, reached))
                self.log(
                    f"pod: {preempted}; preemption {len(self.preemptions)}: deleting the slice and "
                    "requesting it again"
                )
                self.delete()
                stages = (
                    stages[stages.index(preempted.stage) :] if preempted.stage in stages else stages
                )
        if self.preemptions:
            self.log(
                f"pod: {len(self.preemptions)} preemption(s): "
                + "; ".join(map(str, self.preemptions))
            )

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
        except SlicePreempted:
            raise
        except PodError as error:
            self.log(f"pod: {error}; fetching what there is")
            local_run = self.fetch(remote_run_dir, local_root, tolerate=True)
            raise PodError(
                f"{error}; the workers' logs are in {log_path(local_run, 'N').parent}/"
            ) from None
        local_run = self.fetch(remote_run_dir, local_root)
        if not self.dry_run:
            self.log(f"pod: done; the run folder and the workers' logs are in {local_run}")

    def create(self):
        self.slice_exists = False
        self.execute([self.pod.create()])
        self.slice_exists = True

    def delete(self):
        self.execute([self.pod.delete()])
        self.slice_exists = False

    @contextlib.contextmanager
    def deleting(self, delete):
        """Deletes the slice on the way out when asked, whatever happened
        inside (a slice left behind goes on billing), unless there is none."""
        try:
            yield self
        finally:
            if delete and self.slice_exists is not False:
                self.delete()


def _overlap(old, new):
    """The lines of `new` already printed: the longest tail of `old` that
    `new` starts with."""
    for start in range(len(old)):
        if new[: len(old) - start] == old[start:]:
            return old[start:]
    return []
