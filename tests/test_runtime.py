import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from processes import ROOT

from pipeline.parallel.runtime import set_seed


def test_set_seed_makes_keras_initialisers_repeat():
    def initial_kernel():
        layer = keras.layers.Dense(4)
        layer.build((None, 3))
        return np.asarray(layer.kernel.value)

    set_seed(7)
    first = initial_kernel()
    set_seed(7)
    np.testing.assert_array_equal(initial_kernel(), first)
    set_seed(8)
    assert not np.array_equal(initial_kernel(), first)


def test_set_seed_keeps_earlier_tokenizers_working(tiny_model):
    _, tokenizer = tiny_model

    def tokenize():
        return list(tf.data.Dataset.from_tensor_slices(["the old lighthouse"]).map(tokenizer))

    before = tokenize()
    set_seed(0)
    np.testing.assert_array_equal(tokenize()[0], before[0])


NOISY_CHILD = """
import os, sys
from pipeline.parallel.runtime import quiet_native_logs
with quiet_native_logs():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called "
                b"are written to STDERR\\n")
    os.write(2, b"E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: "
                b"UNKNOWN ERROR (303)\\n")
    os.write(2, b"normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. "
                b"use identity normalization.\\n")
    os.write(2, b"E0000 00:00:1.0 1 mkl_util.h:90] oneDNN supports DT_INT64 only on "
                b"platforms with AVX-512. Falling back to the default Eigen\\n")
    os.write(2, b"F0000 real trouble: a check failed\\n")
    print("python says hi", file=sys.stderr)
"""


@pytest.mark.parametrize("verbose", ["", "1"])
def test_native_start_up_notices_are_dropped_and_other_lines_kept(verbose):
    env = {k: v for k, v in os.environ.items() if k != "VERBOSE"}
    env["VERBOSE"] = verbose
    result = subprocess.run(
        [sys.executable, "-c", NOISY_CHILD], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "real trouble: a check failed" in result.stderr and "python says hi" in result.stderr
    notices = ("absl::InitializeLog", "cuInit", "precompiled_charsmap", "AVX-512")
    assert all((word in result.stderr) == bool(verbose) for word in notices), result.stderr


def test_input_errors_are_one_line_and_other_errors_keep_their_traceback(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,rewrite_prompt\n")
    one_line = subprocess.run(
        [
            sys.executable,
            "scripts/score.py",
            f"score.predictions={bad}",
            f"score.truth={bad}",
            f"run.root={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert one_line.returncode == 1
    assert one_line.stderr.strip().splitlines() == [
        f"error: {bad}: a header (id,rewrite_prompt) and no rows; add rows"
    ]
    crash = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, 'scripts'); import _cli\n"
            "def stage(cfg): raise ValueError('deep inside a library')\n"
            "_cli.run_or_exit(stage, None)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert crash.returncode == 1
    assert (
        "Traceback (most recent call last)" in crash.stderr
        and "ValueError: deep inside a library" in crash.stderr
    )


def test_orbaxs_ocdbt_merge_notice_is_dropped_and_other_absl_records_kept(tmp_path, caplog):
    """Orbax logs it at every save of a plain zarr checkpoint."""
    import logging

    from pipeline.parallel.checkpoint import CheckpointStore

    CheckpointStore(tmp_path / "checkpoints", {}, keep=1).close()
    absl = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING, logger="absl"):
        absl.warning("[process=0] Skipping merge of OCDBT checkpoints: No per-process OCDBT")
        absl.warning("a save failed")
    assert [r.getMessage() for r in caplog.records] == ["a save failed"]


COMPILING_CHILD = """
import sys
from pipeline.parallel.runtime import setup_environment
from pipeline.run.config import DistributionConfig
setup_environment(DistributionConfig(), compilation_cache=sys.argv[1] or None)
import jax, jax.numpy as jnp
print(jax.jit(lambda x: x * 2 + 1)(jnp.arange(3)).tolist(), jax.config.jax_compilation_cache_dir)
"""


def compile_in_a_child(folder):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    done = subprocess.run(
        [sys.executable, "-c", COMPILING_CHILD, str(folder or "")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_compiled_programs_are_kept_for_the_next_process(tmp_path):
    folder = tmp_path / "compilation_cache"
    assert compile_in_a_child(folder) == f"[1, 3, 5] {folder}\n"
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("*-cache")}
    assert kept  # a program that compiles in well under a second is kept too
    assert compile_in_a_child(folder) == f"[1, 3, 5] {folder}\n"
    # Read back, not compiled and written again.
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*-cache")} == kept


def test_no_compilation_cache_when_turned_off():
    assert compile_in_a_child(None) == "[1, 3, 5] None\n"
