"""Cloud TPU slices from this machine: the gcloud commands of a pod run.

A run on a TPU VM slice is: create the slice, copy the repository and the
data to every worker, install `requirements-tpu.txt`, start the same stage
on every worker (each finds the others through `keras.distribution.
initialize()`), copy the run folder back from worker 0 (the only writer),
and delete the slice when asked. Each step is one gcloud command, built here
as an argument list, so that `--dry-run` prints exactly what would run.

Example:
```python
pod = TpuPod(name="prompts", zone="europe-west4-a", accelerator_type="v3-32",
             runtime_version="tpu-ubuntu2204-base", spot=True)
for command in pod.up(repo_archive, ["data/test.csv"], "make finetune CONFIG=...", "runs/cloud_tpu_v3_32", "runs"):
    print(shlex.join(command))
```
"""

import dataclasses
import io
import shlex
import subprocess
import tarfile
from pathlib import Path
from typing import Optional

REMOTE_REPO = "prompt-recovery"  # in each worker's home folder


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

    def ssh(self, remote_command, worker="all"):
        return self._gcloud("ssh", self.name, f"--worker={worker}", f"--command={remote_command}")

    def copy_to_workers(self, local_paths, remote_dir):
        return self._gcloud("scp", "--recurse", "--worker=all", *map(str, local_paths), f"{self.name}:{remote_dir}")

    def copy_from_worker_0(self, remote_path, local_dir):
        return self._gcloud("scp", "--recurse", "--worker=0", f"{self.name}:{remote_path}", str(local_dir))

    def delete(self):
        return self._gcloud("delete", self.name, "--quiet")

    def setup(self, repo_archive, data_paths):
        """Repository (an archive from `archive_repository`) and data on every
        worker, then the TPU requirements installed there."""
        unpack = (f"mkdir -p {REMOTE_REPO}/data && tar -xzf {Path(repo_archive).name} -C {REMOTE_REPO} "
                  f"&& rm {Path(repo_archive).name}")
        commands = [self.copy_to_workers([repo_archive], "~/"), self.ssh(unpack)]
        if data_paths:
            commands.append(self.copy_to_workers(data_paths, f"~/{REMOTE_REPO}/data/"))
        commands.append(self.ssh(f"cd {REMOTE_REPO} && make install REQUIREMENTS=requirements-tpu.txt"))
        return commands

    def run(self, make_command):
        return self.ssh(f"cd {REMOTE_REPO} && {make_command}")

    def up(self, repo_archive, data_paths, make_command, remote_run_dir, local_dir, delete=False):
        """Every command of a whole run, in order."""
        commands = [self.create(), *self.setup(repo_archive, data_paths), self.run(make_command),
                    self.copy_from_worker_0(f"{REMOTE_REPO}/{remote_run_dir}", local_dir)]
        return commands + ([self.delete()] if delete else [])


def make_command(target, config, overrides):
    """The make line every worker runs for a stage (or `all`)."""
    words = ["make", target, f"CONFIG={config}", "REQUIREMENTS=requirements-tpu.txt"]
    if overrides:
        words.append("ARGS=" + " ".join(overrides))
    return shlex.join(words)


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


def execute(commands, dry_run=False, log=print):
    """Runs the commands in order (stops at the first failure); with
    dry_run, prints them only."""
    for command in commands:
        log(("(dry run) " if dry_run else "+ ") + shlex.join(command))
        if not dry_run:
            subprocess.run(command, check=True)
