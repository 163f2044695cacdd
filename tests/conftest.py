"""Test set-up: JAX on 8 virtual CPU devices (the TPU v3-8 mesh) with a
persistent compilation cache, the tiny stand-in artifacts built once per
machine (skipped when already built), and a GCS emulator on loopback for the
tests that write to a bucket.

`make test` runs the files on two pytest-xdist workers: each file's tests
stay on one worker (its module fixtures are built once), and the tests of the
session's demo run share one worker with it."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from processes import tiny_config

from pipeline.models.tiny import stand_in_store
from pipeline.parallel.runtime import setup_environment
from pipeline.run.config import DistributionConfig

ROOT = Path(__file__).resolve().parent.parent

# One compilation cache for the session and every process it starts, kept
# between sessions and shared by the machine's clones, beside the stand-ins:
# most of the suite's time is XLA compiling the same small programs in
# processes of their own.
setup_environment(
    DistributionConfig(host_device_count=8),
    compilation_cache=stand_in_store() / "compilation_cache",
)

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the test ids
def pytest_collection_modifyitems(items):
    """Groups the tests for pytest-xdist (`--dist loadgroup`): by file, the
    demo run's users together."""
    for item in items:
        group = "demo_run" if "demo_run" in item.fixturenames else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def tiny():
    from pipeline.models.tiny import TINY_DIR, build_tiny_artifacts

    return build_tiny_artifacts(ROOT / TINY_DIR, log=lambda *_: None)


@pytest.fixture
def tiny_cfg(tiny, tmp_path):
    """The embedded default, writing into a temporary run root."""
    return tiny_config(tiny, tmp_path)


@pytest.fixture(scope="session")
def tiny_model(tiny):
    """(GemmaCausalLM without preprocessor, tokenizer) on the (1, 8) mesh."""
    from pipeline.models.model import load_model
    from pipeline.run.config import load_config

    cfg = load_config(None, [f"model.preset={tiny.preset}"])
    return load_model(cfg, [8])


@pytest.fixture(scope="session")
def demo_run(tiny, tmp_path_factory):
    """The demo (every stage, base and fine-tuned) run once per session:
    (config, scores). Tests of what comes after training share it."""
    from pipeline.workflows.demo import run_demo

    cfg = tiny_config(tiny, tmp_path_factory.mktemp("demo"))
    logs = []
    scores = run_demo(cfg, log=logs.append)
    return cfg, scores, logs


@pytest.fixture
def gcs_bucket(tmp_path):
    """A bucket, `gs://prompt-recovery-test`, on a GCS emulator
    (gcp-storage-emulator, in memory, tests/standins/gcs_emulator.py) that
    the test starts on loopback, empty.
    The real clients of this process and of the processes it starts talk to
    it: gcsfs (through etils.epath, Orbax's folder operations) by
    STORAGE_EMULATOR_HOST, tensorstore (Orbax's arrays) by
    TENSORSTORE_GCS_HTTP_URL. gcsfs's gRPC bucket-type probe, which the
    emulator does not serve, is turned off."""
    forget_bucket_listings()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "gcs-emulator.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "standins" / "gcs_emulator.py"),
            str(port),
            "prompt-recovery-test",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, Path(log.name).read_text()
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    os.environ.update(env)
    yield "gs://prompt-recovery-test"
    for key in env:
        os.environ.pop(key)
    server.terminate()
    server.wait()
    forget_bucket_listings()


def forget_bucket_listings():
    """Drops the listings gcsfs keeps in every filesystem instance of this
    process (fsspec's, etils' own), which outlive a test's bucket: an earlier
    test's checkpoints would show in the next one's empty bucket."""
    import gcsfs

    for filesystem in list(gcsfs.GCSFileSystem._cache.values()):
        filesystem.invalidate_cache()
