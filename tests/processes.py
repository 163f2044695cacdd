"""Stage scripts in child processes: one process, or a simulated pod.

A simulated pod is `processes` local processes, each with
`devices // processes` virtual CPU devices, joined by
`keras.distribution.initialize` through a coordinator on localhost, with
gloo for the collectives between them: the configs' own multi-host path.
`bare_python` finds another interpreter (a fresh clone's, Kaggle's).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(tiny, root, overrides=()):
    """The embedded default on the tiny stand-ins, writing under `root`."""
    from pipeline.run.config import load_config

    os.chdir(ROOT)  # config paths are relative to the repository root
    return load_config(
        None,
        [
            f"run.root={root}",
            f"model.preset={tiny.preset}",
            f"score.encoder={tiny.encoder}",
            *overrides,
        ],
    )


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def host_overrides(process_id, processes, port, devices):
    if processes == 1:
        return [f"distribution.host_device_count={devices}"]
    return [
        "distribution.multi_host=true",
        f"distribution.coordinator_address=localhost:{port}",
        f"distribution.num_processes={processes}",
        f"distribution.process_id={process_id}",
        f"distribution.host_device_count={devices // processes}",
    ]


def start_stage(script, overrides, processes=1, devices=8, log_dir=None):
    """Starts `scripts/<script>.py` on every process; returns the Popen list
    (stdout and stderr of process i go to `log_dir/<script>.<i>.log`, by
    default under runs/test-logs/, a folder per pytest-xdist worker)."""
    port = free_port()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    log_dir = Path(log_dir or ROOT / "runs" / "test-logs" / worker)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the test process's 8 devices; each child sets its own
    started = []
    for process_id in range(processes):
        log = open(log_dir / f"{script}.{process_id}.log", "w")
        command = [
            sys.executable,
            f"scripts/{script}.py",
            *overrides,
            *host_overrides(process_id, processes, port, devices),
        ]
        started.append(
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
        started[-1].log_path = log.name
    return started


def run_stage(script, overrides, processes=1, devices=8, log_dir=None, timeout=900):
    """Runs the stage to the end on every process; returns each process's
    output. Fails with the output of a process that failed."""
    started = start_stage(script, overrides, processes, devices, log_dir)
    try:
        for process in started:
            process.wait(timeout=timeout)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
    outputs = [Path(p.log_path).read_text() for p in started]
    for process, output in zip(started, outputs, strict=True):
        assert process.returncode == 0, f"{script} failed ({process.returncode}):\n{output[-4000:]}"
    return outputs


def bare_python(version="3.10"):
    """An interpreter of `version` without this project's packages (pyenv's
    or the system's): what a fresh clone's `python3` may be."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = [
        *sorted(pyenv.glob(f"versions/{version}.*/bin/python3")),
        Path(f"/usr/bin/python{version}"),
    ]
    for python in found:
        if python.exists() and not imports_yaml(python):
            return python
    pytest.skip(f"no Python {version} without PyYAML on this machine")


def imports_yaml(python):
    return subprocess.run([python, "-c", "import yaml"], capture_output=True).returncode == 0
