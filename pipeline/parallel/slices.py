"""Cloud TPU slices by accelerator type: devices, hosts, runtime image.

What JAX sees on a slice follows from its `--accelerator-type`: v2 and v3
count TensorCores, each a device, 8 to a host; v4 and v5p count TensorCores
too, but two make one device (megacore), 4 to a host; v5e (`v5litepod-N`)
and v6e count chips, each a device, 8 on a one-host slice and 4 to a host
beyond. Each generation boots its own runtime image. The launcher checks a
config's mesh against the slice before it creates anything.

Example:
```python
tpu = slice_of("v4-32")  # 16 devices on 4 hosts, tpu-ubuntu2204-base
tpu.mesh                 # [4, 4]: the data axis over hosts, the model axis within one
```
"""

import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Generation:
    runtime: str  # the TPU VM image that generation boots
    cores_per_device: int  # TensorCores JAX shows as one device (the count's unit per device)
    devices_per_host: int  # on a slice of more than one host


GENERATIONS = {
    "v2": Generation("tpu-ubuntu2204-base", 1, 8),
    "v3": Generation("tpu-ubuntu2204-base", 1, 8),
    "v4": Generation("tpu-ubuntu2204-base", 2, 4),
    "v5p": Generation("v2-alpha-tpuv5", 2, 4),
    "v5litepod": Generation("v2-alpha-tpuv5-lite", 1, 4),
    "v6e": Generation("v2-alpha-tpuv6e", 1, 4),
}
SINGLE_HOST_DEVICES = 8  # v5e and v6e: up to 8 chips on one host


class SliceError(ValueError):
    """An accelerator type or mesh that does not fit; the message says what would."""


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator_type: str
    devices: int
    hosts: int
    runtime: str

    @property
    def mesh(self):
        """(data, model): batches over the hosts, weights within one."""
        return [self.hosts, self.devices // self.hosts]

    def describe(self):
        return (
            f"{self.accelerator_type}: {self.devices} devices on {self.hosts} host(s), "
            f"runtime {self.runtime}"
        )


def slice_of(accelerator_type, runtime=None):
    """The slice `--accelerator-type` makes; `runtime` replaces its
    generation's image."""
    match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not match:
        raise SliceError(
            f"--accelerator-type {accelerator_type}: expected a Cloud TPU type such as v3-32, "
            f"v4-32, v5litepod-16 or v6e-16 (one of {', '.join(GENERATIONS)} and a size)"
        )
    generation = GENERATIONS[match[1]]
    devices = int(match[2]) // generation.cores_per_device
    per_host = generation.devices_per_host
    if match[1] in ("v5litepod", "v6e") and devices <= SINGLE_HOST_DEVICES:
        per_host = devices
    hosts = max(1, devices // per_host)
    return Slice(accelerator_type, devices, hosts, runtime or generation.runtime)


def mesh_override(tpu, mesh_shape, set_on_command_line):
    """None when `mesh_shape` spans the slice's devices; else the override
    that gives the slice's own mesh, unless the user set the mesh on the
    command line (then it is refused)."""
    if math.prod(mesh_shape) == tpu.devices:
        return None
    if set_on_command_line:
        raise SliceError(
            f"distribution.mesh_shape={list(mesh_shape)} spans {math.prod(mesh_shape)} devices; "
            f"{tpu.describe()}: give distribution.mesh_shape=[{tpu.mesh[0]},{tpu.mesh[1]}] "
            "(or leave it out)"
        )
    return f"distribution.mesh_shape=[{tpu.mesh[0]},{tpu.mesh[1]}]"
