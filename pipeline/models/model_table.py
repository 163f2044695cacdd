"""The model table of docs/models.md: per family and published architecture, the
mesh shapes its weights shard on, and whether a target machine holds its
training and generation by the memory plan, on the first mesh of that
machine that shards it. Plain arithmetic on the families' data: no
download, no device.

Example:
```python
print(markdown_table(model_table({"v3-8": load_config("configs/kaggle_tpu_v3_8.yaml")})))
```
"""

import dataclasses

from pipeline.models.families.family import ModelSpec
from pipeline.models.families.registry import FAMILIES
from pipeline.models.memory import plan_memory
from pipeline.parallel.distribution import DistributionError, check_shardable

# The machines of the model table and their configs.
TARGET_CONFIGS = {
    "TPU v3-8": "configs/kaggle_tpu_v3_8.yaml",
    "TPU v5e-8": "configs/kaggle_tpu_v5e_8.yaml",
    "2 x T4": "configs/kaggle_gpu_t4x2.yaml",
}


def meshes(device_count):
    """(data, model) shapes of `device_count` devices, most model-parallel first."""
    return [[device_count // m, m] for m in range(device_count, 0, -1) if device_count % m == 0]


def shards_on(spec, mesh_shape, axis_names=("batch", "model")):
    if mesh_shape[1] == 1:
        return True  # data parallelism replicates every weight
    try:
        check_shardable(
            spec.family.layout_axes(*axis_names), spec.weight_dims(), mesh_shape, list(axis_names)
        )
    except DistributionError:
        return False
    return True


@dataclasses.dataclass
class TableRow:
    family: str
    architecture: str
    meshes_of_8: list  # the (data, model) shapes of 8 devices it shards on
    # target -> "yes, <the first mesh it fits on>", or
    # "no: <the plan's suggestion on the first one it shards on>"
    fits: dict


def model_table(targets):
    """targets: {name: config of that machine}; one row per architecture."""
    rows = []
    for family in FAMILIES.values():
        for name, config in family.architectures.items():
            spec = ModelSpec(family, config)
            fits = {}
            for target, cfg in targets.items():
                devices = cfg.distribution.mesh_shape[0] * cfg.distribution.mesh_shape[1]
                for mesh in filter(lambda mesh: shards_on(spec, mesh), meshes(devices)):
                    trial = dataclasses.replace(
                        cfg, distribution=dataclasses.replace(cfg.distribution, mesh_shape=mesh)
                    )
                    plan = plan_memory(trial, spec)
                    if plan.fits(plan.training) and plan.fits(plan.generation):
                        fits[target] = f"yes, [{mesh[0]},{mesh[1]}]"
                        break
                    fits.setdefault(target, f"no: {plan.suggestions[0]}")
            rows.append(
                TableRow(family.name, name, [m for m in meshes(8) if shards_on(spec, m)], fits)
            )
    return rows


def markdown_table(rows):
    targets = list(rows[0].fits)
    lines = [
        "| family | architecture | shards on (8 devices) | "
        + " | ".join(f"fits {t}" for t in targets)
        + " |",
        "|---" * (3 + len(targets)) + "|",
    ]
    for row in rows:
        shards = ", ".join(f"[{d},{m}]" for d, m in row.meshes_of_8)
        lines.append(
            f"| {row.family} | {row.architecture} | {shards} | "
            + " | ".join(row.fits.values())
            + " |"
        )
    return "\n".join(lines)
