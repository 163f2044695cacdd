"""The configuration page's table of plans: for every config in `configs/`,
one device's memory budget, training and generation by the memory plan, and
what the run writes by the disk plan, in GiB. Every config but the embedded
default is planned for Gemma 7B (its published architecture: no download);
the embedded default for the tiny Gemma it runs.

Example:
```python
print(markdown_plans(config_plans({"cpu_tiny": load_config("configs/cpu_tiny.yaml")})))
```
"""

from pipeline.models.disk import plan_disk
from pipeline.models.families import gemma
from pipeline.models.families.family import ModelSpec
from pipeline.models.memory import GIB, plan_memory
from pipeline.models.tiny import BACKBONE_CONFIG

# A plan this close to the budget fits, but with little to spare.
EDGE = 0.97

COLUMNS = [
    "config",
    "memory budget",
    "training",
    "generation",
    "adapter",
    "checkpoints",
    "PEFT export",
    "merged export",
    "the run",
]


def planned_spec(name):
    """The model a config is planned for."""
    if name == "cpu_tiny":
        return ModelSpec(gemma.FAMILY, BACKBONE_CONFIG)
    return ModelSpec(gemma.FAMILY, gemma.FAMILY.architectures["gemma_7b"])


def config_plans(configs):
    """configs: {name: config}; one row of cells per config."""
    return [_row(name, cfg) for name, cfg in configs.items()]


def _row(name, cfg):
    spec = planned_spec(name)
    memory, disk = plan_memory(cfg, spec), plan_disk(cfg, spec)
    run = f"{disk.total / GIB:.1f}"
    if disk.limit_gib:
        run += f" (limit {disk.limit_gib:g})"
    return [
        f"`{name}`",
        f"{memory.budget / GIB:.1f}",
        _fits(memory, memory.training),
        _fits(memory, memory.generation),
        f"{disk.adapter / GIB:.1f}",
        f"{disk.checkpoints / GIB:.1f}",
        f"{disk.peft_export / GIB:.1f}",
        f"{disk.merged_export / GIB:.1f}" if cfg.export.merged else "off",
        run,
    ]


def _fits(memory, total):
    if not memory.fits(total):
        verdict = "does not fit"
    elif total > EDGE * memory.budget:
        verdict = "fits, at the edge"
    else:
        verdict = "fits"
    return f"{total / GIB:.1f} ({verdict})"


def markdown_plans(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
