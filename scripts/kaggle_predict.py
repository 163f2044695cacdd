"""The Kaggle notebook's entry point, shipped inside the offline bundle.

In a notebook with the internet off and the bundle attached as a dataset:

    !python /kaggle/input/<your-bundle>/kaggle_predict.py

Installs the bundle's wheels with no package index (torch is Kaggle's own),
then writes the submission (default: settings.json's `output`,
/kaggle/working/submission.csv) for the competition's test.csv.
"""

import argparse
import importlib
import json
import platform
import subprocess
import sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent


def check_python(settings):
    """Stops before pip when this notebook's Python or machine is not the one
    the bundle's wheels were fetched for, saying what to rebuild."""
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    machine = platform.machine()
    arches = {tag.split("_", 3)[-1] for tag in settings["platforms"]}
    if running != settings["python_version"] or sys.platform != "linux" or machine not in arches:
        sys.exit(
            f"error: this bundle's wheels are for Python {settings['python_version']} on "
            f"{', '.join(settings['platforms'])}; this notebook runs Python {running} on "
            f"{sys.platform} {machine}. Rebuild it: make kaggle-bundle "
            f'ARGS="kaggle.python_version={running}"'
        )


def install(bundle):
    wheels = bundle / "wheels"
    project = [str(w) for w in sorted(wheels.glob("prompt_recovery-*.whl"))]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--find-links",
            str(wheels),
            "-r",
            str(bundle / "requirements.txt"),
            *project,
        ],
        check=True,
    )
    importlib.invalidate_caches()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="competition CSV (default: settings.json's input)")
    parser.add_argument("--output", help="submission CSV (default: settings.json's output)")
    parser.add_argument(
        "--base-model", help="transformers folder of the base model (default: settings.json's)"
    )
    parser.add_argument(
        "--no-install", action="store_true", help="the wheels are installed already"
    )
    args = parser.parse_args()
    settings = json.loads((BUNDLE / "settings.json").read_text())
    if not args.no_install:
        check_python(settings)
        install(BUNDLE)
    from pipeline.errors import InputError
    from pipeline.kaggle.transformers_predict import run_transformers_predict

    if args.base_model:
        settings["base_model"] = args.base_model
    try:
        run_transformers_predict(
            settings, BUNDLE, args.input or settings["input"], args.output or settings["output"]
        )
    except InputError as e:  # bad input: one line; anything else keeps its traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
