"""Process set-up that must happen before JAX, Keras or TensorFlow start.

JAX owns the accelerators. TensorFlow only runs tf.data, tokenisation and the
TF Hub scorer, on the CPU: if it claimed the TPU or GPU first, JAX could not
get it (or would share its memory).

The native libraries print start-up notices to the process's stderr that
are not errors (TensorFlow's CUDA probe on a machine without a GPU, absl's
"before InitializeLog" banner, SentencePiece's normalizer line). The calls
that print them run inside `quiet_native_logs`, which drops those lines and
passes every other one on; `VERBOSE=1` in the environment shows them all.

Example:
```python
cfg = load_config("configs/cpu_tiny.yaml")
setup_environment(cfg.distribution)  # before `import keras`
```
"""

import contextlib
import os
import re
import sys
import tempfile

# Start-up notices of TensorFlow, absl, CUDA probes, oneDNN and SentencePiece.
NATIVE_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|cudart_stub\.cc.*Could not find cuda drivers"
    r"|cuda_platform\.cc.*failed call to cuInit"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|oneDNN custom operations are on"
    r"|oneDNN supports DT_\w+ only on platforms with AVX-512"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|rebuild TensorFlow with the appropriate compiler flags"
    r"|TF-TRT Warning"
    r"|normalizer\.cc.*precompiled_charsmap is empty"
)

# The compilation cache's size; the least recently used programs go first.
COMPILATION_CACHE_BYTES = 4 << 30


def verbose():
    """True when `VERBOSE=1` asks for every native log line and tracebacks."""
    return os.environ.get("VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def quiet_native_logs():
    """Runs the block with file descriptor 2 caught in a temporary file, then
    writes every caught line that is not a known start-up notice to stderr.
    Exceptions pass through unchanged (after the replay)."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [
                line
                for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                if not NATIVE_NOISE.search(line)
            ]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def setup_environment(distribution_cfg, memory_fraction=None, compilation_cache=None):
    """Selects the JAX backend, the virtual CPU device count, the share of a
    GPU's memory JAX takes (`hardware.memory_fraction`), the folder of
    compiled programs kept between processes (`run.compilation_cache`), and
    hides accelerators from TensorFlow."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    if compilation_cache:
        use_compilation_cache(compilation_cache)
    if memory_fraction:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(memory_fraction))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # gs:// folders (Orbax's checkpoint folders, through etils.epath) by
    # fsspec's gcsfs rather than tf.io.gfile, whose GCS client cannot be
    # pointed at the tests' emulator: the same client in tests and on a TPU VM.
    os.environ.setdefault("EPATH_USE_TF", "false")
    count = distribution_cfg.host_device_count
    if count:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            if "jax" in sys.modules:
                raise RuntimeError(
                    "distribution.host_device_count is set but JAX was imported "
                    "before setup_environment(); call it first"
                )
            os.environ["XLA_FLAGS"] = (
                f"{flags} --xla_force_host_platform_device_count={count}".strip()
            )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if distribution_cfg.multi_host:
            # Collectives between processes on the CPU (a simulated pod).
            os.environ.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")
    with quiet_native_logs():
        hide_accelerators_from_tensorflow()


def use_compilation_cache(folder):
    """Keeps every program XLA compiles in `folder` (JAX's persistent
    compilation cache) for later processes, unless the environment names a
    folder already (a test session's, shared by the processes it starts).

    JAX's defaults keep only programs that took a second or more to compile;
    on the CPU most take less, and a stage compiles dozens, so every program
    is kept. A size limit turns on JAX's file lock, so that two processes
    (the hosts of a simulated pod) never read an entry half written."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(folder))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(COMPILATION_CACHE_BYTES))


def hide_accelerators_from_tensorflow():
    try:
        import tensorflow as tf
    except ImportError:  # nothing to hide (a GPU machine for the benchmark alone)
        return

    for device_type in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], device_type)
        except (RuntimeError, ValueError):
            # RuntimeError: TF already initialised its devices (then an
            # earlier call hid them); ValueError: no such device type here.
            pass


def set_seed(seed):
    """Seeds Python, NumPy and Keras' global generator (layer initialisers,
    `keras.random`), like `keras.utils.set_random_seed` but without
    `tf.random.set_seed`: in eager mode that clears TensorFlow's kernel
    caches, so a tokenizer built earlier in the process fails in tf.data
    ("Resource ... SentencepieceOp ... does not exist"). The pipeline's
    tf.data shuffles take their seeds explicitly."""
    import random

    import numpy as np

    from pipeline import keras_internals

    keras_internals.reset_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
