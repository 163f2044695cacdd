"""Training checkpoints with Orbax: the trainable state, each host its own shards.

A checkpoint holds what exact resumption needs, and nothing more: the LoRA
weights (the trainable variables), every optimizer variable (AdamW's step
count and moments), the number of steps done (which, with the seeded batch
plan of `pipeline.text.batching`, fixes the position in the data order), the
per-step losses and epoch logs so far, and the settings that shape the run.
The frozen base weights are not in it: they come from the preset again (a
Keras `OrbaxCheckpoint` callback would write the whole 7B base at every
save). Training draws no random numbers (no dropout; the batch order is a
function of seed and epoch), so there is no random state to keep.

Each save is one step of an `orbax.checkpoint.CheckpointManager` in the
checkpoint folder (`<folder>/<step>/`): `state`, the arrays, and `meta`, a
JSON of the settings and the progress. Every host writes the shards its own
devices hold, in the background while training goes on; a step counts only
once Orbax has committed it, so a kill at any moment leaves the last
committed checkpoint. The newest `keep` are kept. Restoring reads each array
straight into the sharding the current model gives it (a checkpoint written
on a [1, 8] mesh resumes on [2, 4]); each host reads only its own shards, and
no checkpoint crosses a collective. On a pod the folder must be one every
host reaches (a bucket, or a shared filesystem): `check_reachable` says so
before training starts.

Example:
```python
store = CheckpointStore(stage_dir / "checkpoints", settings, keep=2)
progress = store.restore(causal_lm)  # None: no checkpoint, start at step 0
store.save(causal_lm, Progress(step=120, step_losses=[...], epochs={}))
store.close()  # waits for the last save
```
"""

import dataclasses
import json
import logging
import secrets

from pipeline.errors import InputError
from pipeline.parallel import hosts
from pipeline.parallel.runtime import verbose


class CheckpointMismatch(InputError):
    """A checkpoint written by a run with other settings."""


@dataclasses.dataclass
class Progress:
    step: int = 0  # optimizer steps done
    step_losses: list = dataclasses.field(default_factory=list)
    epochs: dict = dataclasses.field(default_factory=dict)  # Keras epoch logs, name -> list
    epoch_throughput: list = dataclasses.field(default_factory=list)
    # Validation scores by the metric: {"step": ..., "score": ...} each.
    evaluations: list = dataclasses.field(default_factory=list)


def _variables(causal_lm):
    return list(causal_lm.trainable_variables) + list(causal_lm.optimizer.variables)


def _without_ocdbt_merge_notice(record):
    """Drops the warning Orbax logs at every save: its pytree handler tries to
    merge per-process OCDBT files whether OCDBT is on or not, and says it
    found none. Every other absl record passes."""
    return "Skipping merge of OCDBT checkpoints" not in str(record.msg)


class CheckpointStore:
    def __init__(self, folder, settings, keep):
        """folder: a local path or a bucket URL (gs://...); settings:
        JSON-able dict of everything that shapes the training trajectory (a
        checkpoint is only resumed under the same); keep: how many of the
        newest checkpoints to keep. Every process of a pod makes one."""
        import orbax.checkpoint as ocp

        self.folder = str(folder)
        self.settings = json.loads(json.dumps(settings))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True
        )
        # Plain zarr, a folder per array, rather than Orbax's default OCDBT
        # database: OCDBT's manifest writes need the object generations that
        # the tests' GCS emulator does not report ("Malformed
        # StorageGeneration"), and the LoRA state is a few hundred arrays.
        handlers = {
            "state": ocp.StandardCheckpointHandler(use_ocdbt=False),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(self.folder, options=options, item_handlers=handlers)
        if not verbose():
            logging.getLogger("absl").addFilter(_without_ocdbt_merge_notice)

    def save(self, causal_lm, progress):
        """Starts writing a checkpoint at `progress.step` and returns; every
        process calls it (each writes its own shards)."""
        import orbax.checkpoint as ocp

        variables = _variables(causal_lm)
        meta = {
            "settings": self.settings,
            "progress": dataclasses.asdict(progress),
            "variables": [[v.path, list(v.shape)] for v in variables],
        }
        state = {"variables": [v.value for v in variables]}
        self._manager.save(
            progress.step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def wait(self):
        """Blocks until the saves started so far are committed."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()

    def restore(self, causal_lm):
        """Loads the newest checkpoint into the model and its (built)
        optimizer, each array in the sharding the model gives it, and
        returns its Progress; None when there is none. Raises
        CheckpointMismatch when it was written under other settings or for
        other variables."""
        import jax
        import orbax.checkpoint as ocp

        step = self._manager.latest_step()
        if step is None:
            return None
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
        self._check_settings(meta["settings"])
        variables = _variables(causal_lm)
        self._check_variables(meta["variables"], variables)
        target = {
            "variables": [
                jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.value.sharding) for v in variables
            ]
        }
        state = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
        for variable, value in zip(variables, state["variables"], strict=True):
            variable.assign(value)
        return Progress(**meta["progress"])

    def _check_settings(self, saved):
        changed = [
            f"{key}: {saved.get(key)!r} then, {value!r} now"
            for key, value in self.settings.items()
            if saved.get(key) != value
        ]
        if changed:
            raise CheckpointMismatch(
                f"{self.folder} holds a checkpoint written by a run with other settings "
                f"({'; '.join(changed)}); "
                "resuming would mix two trainings. Delete it to start over, or use another run.name"
            )

    def _check_variables(self, saved, variables):
        # By shape, in order: Keras numbers the paths of a process's second
        # optimizer or model (adam_w_1/...).
        now = [[v.path, list(v.shape)] for v in variables]
        if [shape for _, shape in saved] != [shape for _, shape in now]:
            first = next(
                (
                    f"{a[0]} {a[1]} then, {b[0]} {b[1]} now"
                    for a, b in zip(saved, now, strict=False)
                    if a[1] != b[1]
                ),
                f"{len(saved)} variables then, {len(now)} now",
            )
            raise CheckpointMismatch(
                f"{self.folder} holds other variables than the model's ({first}); "
                "delete it to start over, or use another run.name"
            )


def check_tensorstore_writes(url, key):
    """Raises InputError naming `key` unless tensorstore, Orbax's writer of
    the arrays, can write to (and delete from) the bucket folder `url`. It
    refuses what gcsfs accepts (e.g. a bucket name shorter than 3
    characters), which would otherwise show only at the first checkpoint's
    asynchronous save, `train.checkpoint_every` steps into training."""
    import tensorstore

    bucket, _, path = url.removeprefix("gs://").partition("/")
    probe = f".write-probe-{secrets.token_hex(4)}"
    try:
        spec = {"driver": "gcs", "bucket": bucket, "path": f"{path.strip('/')}/".lstrip("/")}
        store = tensorstore.KvStore.open(spec).result()
        store.write(probe, b"probe").result()
        store.write(probe, None).result()  # None deletes the one key
    except Exception as error:  # tensorstore raises ValueError for all of it
        raise InputError(
            f"{key} {url}: tensorstore (which writes the checkpoints' arrays) cannot write there "
            f"({error}); give a bucket it can write to"
        ) from None


def check_reachable(folder):
    """On a pod, raises InputError unless every host sees what process 0
    writes in `folder` (each host writes its own shards of a checkpoint
    there). A bucket is reachable by definition; a local path is only if
    the hosts share it (e.g. a Filestore mount). One process: nothing to check."""
    if hosts.process_count() == 1 or str(folder).startswith("gs://"):
        return
    from pathlib import Path

    marker = Path(folder) / ".written-by-process-0"

    def write_marker():
        marker.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        marker.write_text(token)
        return token

    token = hosts.share_from_main(write_marker)
    seen = marker.exists() and marker.read_text() == token
    blind = [i for i, ok in enumerate(hosts.all_processes(seen)) if not ok]
    if blind:
        raise InputError(
            f"train.checkpoint_dir {folder} is not shared by every host (process(es) {blind} do "
            "not see what "
            "process 0 writes there): on a pod each host writes its own shards of a checkpoint. "
            "Set "
            "train.checkpoint_dir to a bucket (gs://BUCKET/...) or to a folder every worker mounts"
        )
