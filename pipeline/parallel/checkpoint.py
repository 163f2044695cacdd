"""Training checkpoints: what exact resumption needs, and nothing more.

A checkpoint holds the LoRA weights (the trainable variables), every
optimizer variable (AdamW's step count and moments), the number of steps
done (which, with the seeded batch plan of `pipeline.text.batching`, fixes the
position in the data order), the per-step losses and epoch logs so far, and
the settings that shape the run. The frozen base weights are not in it: they
come from the preset again. Training draws no random numbers (no dropout;
the batch order is a function of seed and epoch), so there is no random
state to keep.

One `.npz` file, written beside itself and renamed into place: a kill at
any moment leaves the previous checkpoint or the new one, never half of one.
On a pod every process takes part in gathering the sharded values; process
0 writes, and on resume process 0 reads and shares the file, so only worker
0's disk needs it.

Example:
```python
store = CheckpointStore(stage_dir / "checkpoint.npz", settings)
progress = store.restore(causal_lm)  # None: no checkpoint, start at step 0
store.save(causal_lm, Progress(step=120, step_losses=[...], epochs={}))
```
"""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from pipeline.parallel import hosts
from pipeline.errors import InputError


class CheckpointMismatch(InputError):
    """A checkpoint written by a run with other settings."""


@dataclasses.dataclass
class Progress:
    step: int = 0  # optimizer steps done
    step_losses: list = dataclasses.field(default_factory=list)
    epochs: dict = dataclasses.field(default_factory=dict)  # Keras epoch logs, name -> list
    epoch_throughput: list = dataclasses.field(default_factory=list)


def _variables(causal_lm):
    return list(causal_lm.trainable_variables) + list(causal_lm.optimizer.variables)


class CheckpointStore:
    def __init__(self, path, settings):
        """settings: JSON-able dict of everything that shapes the training
        trajectory; a checkpoint is only resumed under the same settings."""
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))

    def save(self, causal_lm, progress):
        """Every process calls it (the values are gathered over hosts)."""
        values = [hosts.to_numpy(v.value) for v in _variables(causal_lm)]
        if not hosts.is_main_process():
            return
        meta = {"settings": self.settings, "progress": dataclasses.asdict(progress),
                "dtypes": [str(v.dtype) for v in values]}
        arrays = {f"v{i}": _storable(v) for i, v in enumerate(values)}
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "wb") as f:
            np.savez(f, meta=np.asarray(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self.path)

    def restore(self, causal_lm):
        """Loads the checkpoint into the model and its (built) optimizer and
        returns its Progress; None when there is none. Raises
        CheckpointMismatch when it was written under other settings."""
        loaded = hosts.share_from_main(self._read)
        if loaded is None:
            return None
        meta, arrays = loaded
        variables = _variables(causal_lm)
        if len(arrays) != len(variables):
            raise CheckpointMismatch(
                f"{self.path} holds {len(arrays)} variables, the model {len(variables)}; "
                f"delete {self.path} to start over, or use another run.name"
            )
        for variable, array in zip(variables, arrays):
            if tuple(array.shape) != tuple(variable.shape):
                raise CheckpointMismatch(f"{self.path}: {variable.path} has shape {array.shape}, "
                                         f"the model {tuple(variable.shape)}; delete it to start over")
            variable.assign(hosts.global_value(array.astype(variable.dtype), variable.value.sharding))
        return Progress(**meta["progress"])

    def _read(self):
        if not self.path.exists():
            return None
        with np.load(self.path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            arrays = [f[f"v{i}"] for i in range(len(meta["dtypes"]))]
        changed = [
            f"{key}: {meta['settings'].get(key)!r} then, {value!r} now"
            for key, value in self.settings.items()
            if meta["settings"].get(key) != value
        ]
        if changed:
            raise CheckpointMismatch(
                f"{self.path} was written by a run with other settings ({'; '.join(changed)}); "
                "resuming would mix two trainings. Delete it to start over, or use another run.name"
            )
        return meta, arrays


def _storable(array):
    """npz has no bfloat16: keep such values as float32 (exact)."""
    if array.dtype.kind == "V" or str(array.dtype) == "bfloat16":
        return array.astype(np.float32)
    return array
