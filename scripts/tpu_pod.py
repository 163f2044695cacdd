"""Run stages on a Cloud TPU VM slice (a pod) from this machine, with gcloud.

    python scripts/tpu_pod.py up --name prompts --zone europe-west4-a \\
        --accelerator-type v3-32 --spot --data data/source_texts.csv --data data/test.csv \\
        --stage all --delete lora.rank=8

`up` creates the slice, copies the repository (the files git tracks) and the
data to every worker, prepares each worker (a Python 3.11, then
requirements-tpu.txt), starts the stage (or `all`) on every worker detached
from this connection, waits for it while printing worker 0's progress,
copies `runs/<run.name>` back from worker 0 with every worker's log
(`runs/<run.name>/pod-logs/`) and, with --delete, deletes the slice, also
when a step failed. If this machine's connection drops, the stages go on:
`status` and `logs` show them, `wait` waits again (and fetches), `fetch`
copies what there is. With --spot the slice is a queued resource; `up
--retries N` then makes it again when Cloud TPU takes it back, up to N
times, and goes on from the stage it was taken during (for a run on a
bucket, which the next slice resumes from), reporting each preemption and,
during finetune, the steps it cost. `create`, `setup`, `start`, `run`
(start + wait) and `delete` do one step each. --dry-run prints the gcloud
commands only.
"""

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Runs on a fresh clone's python3 (3.10 or later, standard library only), before
# `make install` has installed the package anywhere.
sys.path.insert(0, str(ROOT))

from pipeline.parallel.kaggle_credentials import (  # noqa: E402
    HOW_TO_PROVIDE,
    downloads_from_kaggle,
    find_credentials,
)
from pipeline.parallel.launch import (  # noqa: E402
    REMOTE_REPO,
    Launcher,
    PodError,
    TpuPod,
    archive_repository,
    stages_of,
)
from pipeline.parallel.slices import SliceError, mesh_override, slice_of  # noqa: E402
from pipeline.run.config import ConfigError, load_config  # noqa: E402
from pipeline.run.storage import is_bucket  # noqa: E402

STEPS = ["up", "create", "setup", "start", "wait", "run", "status", "logs", "fetch", "delete"]
ARCHIVE = ROOT / "runs" / "tpu-pod" / "repo.tar.gz"


def mesh_said(cfg, mesh, args):
    if not mesh:
        return f"mesh {cfg.distribution.mesh_shape}"
    return (
        f"mesh {mesh.partition('=')[2]}, the slice's ({args.config} has "
        f"{cfg.distribution.mesh_shape}; the workers get {mesh})"
    )


@contextlib.contextmanager
def credentials_for_workers(preset, step, dry_run):
    """The Kaggle credentials file that setup copies to every worker (None
    when the preset is not downloaded from Kaggle), in a private temporary
    folder while the step runs; exits before anything is created when they
    are needed and missing."""
    if step not in ("up", "create", "setup") or not downloads_from_kaggle(preset):
        yield None
        return
    credentials = find_credentials(os.environ, Path.home())
    if credentials is None:
        sys.exit(
            f"tpu_pod {step}: model.preset {preset} is downloaded from Kaggle on every worker, "
            f"and no Kaggle credentials were found here to copy to them: {HOW_TO_PROVIDE}"
        )
    print(
        f"tpu_pod: model.preset {preset} comes from Kaggle: setup copies the credentials of "
        f"{credentials.source} to ~/.kaggle/{credentials.file_name} on every worker (mode 600)"
    )
    with tempfile.TemporaryDirectory(prefix="tpu-pod-") as folder:
        path = Path(folder) / credentials.file_name
        yield path if dry_run else credentials.write_into(folder)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--name", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True, help="e.g. europe-west4-a (v3 slices)")
    parser.add_argument("--accelerator-type", default="v3-32")
    parser.add_argument(
        "--runtime-version",
        default=None,
        help="TPU VM image (default: the accelerator type's: tpu-ubuntu2204-base for v2 to v4, "
        "v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv6e for v6e)",
    )
    parser.add_argument(
        "--spot",
        action="store_true",
        help="a spot slice, requested as a queued resource (give it to delete and wait too)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=0,
        help="with up: how many times a preempted slice is made again and the run resumed",
    )
    parser.add_argument("--project", default=None)
    parser.add_argument("--config", default="configs/cloud_tpu_v3_32.yaml")
    parser.add_argument(
        "--stage",
        choices=[
            "all",
            "data",
            "finetune",
            "mean-prompt",
            "predict",
            "evaluate",
            "score",
            "compare",
            "export",
        ],
        default="all",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        help="file or folder to copy to data/ on every worker",
    )
    parser.add_argument(
        "--delete", action="store_true", help="with up, run, wait: delete the slice at the end"
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=30.0, help="how often up/run/wait ask the workers"
    )
    parser.add_argument(
        "--lines", type=int, default=40, help="with logs: lines of each worker's log"
    )
    parser.add_argument(
        "--into",
        default=None,
        help="local folder for the fetched run folder "
        "(default: run.root; runs/ for a bucket's run)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the gcloud commands, run nothing"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if not cfg.distribution.multi_host:
        sys.exit(
            f"config error: {args.config} does not set distribution.multi_host: true; a pod needs "
            "it"
        )
    try:
        tpu = slice_of(args.accelerator_type, args.runtime_version)
        mesh = mesh_override(
            tpu,
            cfg.distribution.mesh_shape,
            any(o.startswith("distribution.mesh_shape=") for o in args.overrides),
        )
        overrides = args.overrides + ([mesh] if mesh else [])
        load_config(args.config, overrides)  # what the workers will load, checked here
    except (SliceError, ConfigError) as e:
        sys.exit(f"config error: {e}")
    print(f"tpu_pod: {tpu.describe()}; {mesh_said(cfg, mesh, args)}")
    if args.retries < 0:
        sys.exit(f"--retries {args.retries}: give 0 or more")
    if args.retries and not is_bucket(cfg.run.root):
        sys.exit(
            f"--retries needs run.root on a bucket (gs://...), not {cfg.run.root}: a preempted "
            "slice's disks go "
            "with it, and the next slice resumes from what the bucket holds"
        )
    pod = TpuPod(args.name, args.zone, args.accelerator_type, tpu.runtime, args.spot, args.project)
    launcher = Launcher(pod, dry_run=args.dry_run)
    run_dir = f"{cfg.run.root}/{cfg.run.name}"
    if args.step in ("up", "setup") and not args.dry_run:
        ARCHIVE.parent.mkdir(parents=True, exist_ok=True)
        archive_repository(ROOT, ARCHIVE)
    start = pod.start(stages_of(args.stage), args.config, overrides)
    # A run on a bucket needs no fetch: only the workers' logs come here.
    local_root = args.into or ("runs" if is_bucket(cfg.run.root) else cfg.run.root)
    finish = lambda: launcher.finish(run_dir, local_root, args.poll_seconds)  # noqa: E731
    with credentials_for_workers(cfg.model.preset, args.step, args.dry_run) as credentials:
        setup = pod.setup(ARCHIVE, args.data, args.config, overrides, credentials)
        try:
            if args.step == "up":
                with launcher.deleting(args.delete):
                    launcher.up(
                        setup,
                        lambda stages: pod.start(stages, args.config, overrides),
                        stages_of(args.stage),
                        args.poll_seconds,
                        finish,
                        args.retries,
                    )
            elif args.step in ("run", "wait"):
                with launcher.deleting(args.delete):
                    if args.step == "run":
                        launcher.execute([start])
                    finish()
            elif args.step == "status":
                for status in launcher.statuses():
                    print(status)
            elif args.step == "logs":
                for worker in launcher.workers():
                    print(
                        f"=== worker {worker}: the last {args.lines} lines of "
                        f"~/{REMOTE_REPO}/runs/pod-job/log"
                    )
                    print(launcher.output(pod.job_log(worker, args.lines)), end="")
            elif args.step == "fetch":
                launcher.fetch(run_dir, local_root)
            elif args.step == "create":
                launcher.create()
                launcher.wait_ready(args.poll_seconds)
            else:
                launcher.execute(
                    {
                        "setup": setup,
                        "start": [start],
                        "delete": [pod.delete()],
                    }[args.step]
                )
        except PodError as error:
            sys.exit(f"tpu_pod {args.step}: {error}")


if __name__ == "__main__":
    main()
