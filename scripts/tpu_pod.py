"""Run stages on a Cloud TPU VM slice (a pod) from this machine, with gcloud.

    python scripts/tpu_pod.py up --name prompts --zone europe-west4-a \\
        --accelerator-type v3-32 --spot --data data/source_texts.csv --data data/test.csv \\
        --stage all --delete lora.rank=8

`up` creates the slice, copies the repository (the files git tracks) and the
data to every worker, installs requirements-tpu.txt there, runs the stage
(or `all`) on every worker, copies `runs/<run.name>` back from worker 0 and,
with --delete, deletes the slice. `create`, `setup`, `run`, `fetch` and
`delete` do one step each. --dry-run prints the gcloud commands only.
"""

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.launch import REMOTE_REPO, TpuPod, archive_repository, execute, make_command

ROOT = Path(__file__).resolve().parent.parent

STAGES = ["data", "finetune", "mean-prompt", "predict", "score", "compare", "all"]
ARCHIVE = ROOT / "runs" / "tpu-pod" / "repo.tar.gz"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["up", "create", "setup", "run", "fetch", "delete"])
    parser.add_argument("--name", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True, help="e.g. europe-west4-a (v3 slices)")
    parser.add_argument("--accelerator-type", default="v3-32")
    parser.add_argument("--runtime-version", default="tpu-ubuntu2204-base")
    parser.add_argument("--spot", action="store_true", help="a spot (preemptible) slice")
    parser.add_argument("--project", default=None)
    parser.add_argument("--config", default="configs/cloud_tpu_v3_32.yaml")
    parser.add_argument("--stage", choices=STAGES, default="all")
    parser.add_argument("--data", action="append", default=[], help="file or folder to copy to data/ on every worker")
    parser.add_argument("--delete", action="store_true", help="with up: delete the slice at the end")
    parser.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if not cfg.distribution.multi_host:
        sys.exit(f"config error: {args.config} does not set distribution.multi_host: true; a pod needs it")
    pod = TpuPod(args.name, args.zone, args.accelerator_type, args.runtime_version, args.spot, args.project)
    make = make_command(args.stage, args.config, args.overrides)
    run_dir = f"{cfg.run.root}/{cfg.run.name}"
    if args.step in ("up", "setup") and not args.dry_run:
        ARCHIVE.parent.mkdir(parents=True, exist_ok=True)
        archive_repository(ROOT, ARCHIVE)
    commands = {
        "up": lambda: pod.up(ARCHIVE, args.data, make, run_dir, cfg.run.root, args.delete),
        "create": lambda: [pod.create()],
        "setup": lambda: pod.setup(ARCHIVE, args.data),
        "run": lambda: [pod.run(make)],
        "fetch": lambda: [pod.copy_from_worker_0(f"{REMOTE_REPO}/{run_dir}", cfg.run.root)],
        "delete": lambda: [pod.delete()],
    }[args.step]()
    execute(commands, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
