"""Process set-up that must happen before JAX, Keras or TensorFlow start.

JAX owns the accelerators. TensorFlow only runs tf.data, tokenisation and the
TF Hub scorer, on the CPU: if it claimed the TPU or GPU first, JAX could not
get it (or would share its memory).

Example:
```python
cfg = load_config("configs/cpu_tiny.yaml")
setup_environment(cfg.distribution)  # before `import keras`
```
"""

import os
import sys


def setup_environment(distribution_cfg):
    """Selects the JAX backend, the virtual CPU device count, and hides
    accelerators from TensorFlow."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    count = distribution_cfg.host_device_count
    if count:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            if "jax" in sys.modules:
                raise RuntimeError(
                    "distribution.host_device_count is set but JAX was imported "
                    "before setup_environment(); call it first"
                )
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if distribution_cfg.multi_host:
            # Collectives between processes on the CPU (a simulated pod).
            os.environ.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")
    hide_accelerators_from_tensorflow()


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
