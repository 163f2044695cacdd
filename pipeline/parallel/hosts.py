"""Several hosts, one run: who writes, who decides, how arrays cross hosts.

On a TPU pod every host runs the same command. Process 0 reads the inputs
that decide the work (plans, resume state, checkpoints) and shares them, so
every host makes the same calls in the same order; only process 0 writes
files. Batches are global: each host feeds the rows of every global batch
that its own devices hold (`local_rows`). With one process every helper
here is a plain pass-through.

Example:
```python
initialize(cfg.distribution)            # once, before any JAX computation
plan = share_from_main(lambda: plan_rows(cfg.data))  # read on 0, sent to all
if is_main_process():
    write_table(plan, path)
```
"""

import pickle

import numpy as np

# How long the other hosts wait for process 0's work in `share_from_main`
# (a whole mean-prompt search, say).
MAIN_WORK_TIMEOUT_SECONDS = 24 * 3600
_shares = 0


def initialize(distribution_cfg):
    """Joins the pod (`keras.distribution.initialize`, which also reads
    Keras' `KERAS_DISTRIBUTION_*` variables) when the config says
    multi_host; a second call does nothing."""
    if not distribution_cfg.multi_host:
        return
    import jax

    from pipeline import keras_internals

    if jax.distributed.is_initialized():
        return
    keras_internals.initialize_distribution(
        distribution_cfg.coordinator_address,
        distribution_cfg.num_processes,
        distribution_cfg.process_id,
        distribution_cfg.shutdown_timeout_seconds,
    )


def leave(code):
    """Ends the process with `code`. A process of a pod that failed leaves
    at once, skipping JAX's shutdown barrier: waiting there for hosts that
    are still at work would hold its error back for the barrier's timeout,
    and the others learn of its end from the coordination service."""
    import os
    import sys

    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def process_count():
    import jax

    return jax.process_count()


def process_index():
    import jax

    return jax.process_index()


def is_main_process():
    """True on the process that decides and writes (process 0 of a pod)."""
    return process_index() == 0


def share_from_main(compute):
    """Runs `compute()` on process 0 and returns its result on every
    process. The others wait at a barrier of the pod's coordination service
    while process 0 works, however long that takes (up to
    MAIN_WORK_TIMEOUT_SECONDS), rather than in a device collective or in
    JAX's shutdown barrier, which time out. An exception there is raised on
    every process (with the same message), so no host is left waiting."""
    global _shares
    if process_count() == 1:
        return compute()
    from pipeline import keras_internals

    outcome = None
    if is_main_process():
        try:
            outcome = ("ok", compute())
        except Exception as error:  # re-raised below, on every host
            outcome = ("error", error)
    _shares += 1  # every process makes the same calls in the same order
    keras_internals.wait_at_pod_barrier(f"share_from_main_{_shares}", MAIN_WORK_TIMEOUT_SECONDS)
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise value
    return value


def broadcast_object(obj):
    """Process 0's picklable `obj` on every process."""
    from jax.experimental import multihost_utils

    payload = (
        np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        if is_main_process()
        else np.zeros(0, np.uint8)
    )
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(payload.size, np.int64)))
    buffer = np.zeros(size, np.uint8)
    if is_main_process():
        buffer[:] = payload
    return pickle.loads(multihost_utils.broadcast_one_to_all(buffer).tobytes())


def all_processes(value):
    """Every process's `value` (a bool or a number), in process order, on
    every process. A collective on a pod: every process must call it."""
    if process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(value))).tolist()


def to_numpy(array):
    """The whole value of a (possibly sharded over hosts) array, on every
    process. A collective on a pod: every process must call it."""
    import jax

    if not isinstance(array, jax.Array) or array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def local_rows(sharding, global_shape):
    """slice of dimension 0 of a global array that this process's devices
    hold (the whole batch in one process)."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows = index[0]
        starts.append(rows.start or 0)
        stops.append(global_shape[0] if rows.stop is None else rows.stop)
    return slice(min(starts), max(stops))


def global_batch(array, sharding):
    """A global array of `sharding` from the full numpy batch that every
    process holds; each process puts only its own rows on its devices."""
    import jax

    array = np.asarray(array)
    return jax.make_array_from_process_local_data(
        sharding, array[local_rows(sharding, array.shape)], array.shape
    )
