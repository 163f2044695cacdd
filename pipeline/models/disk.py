"""Disk plan: what a run writes, for a config, before anything runs.

From the model spec (family and config.json only) and the LoRA settings: the
adapter (`.lora.h5`, float32 factors), the training checkpoints (the factors
and their two AdamW moments, float32; `train.keep_checkpoints` of them, and
one more while a new one is written before the oldest goes), the PEFT export
(KerasHub's LoRA has one A per head on the q, k and v kernels, so PEFT's B
there is block-diagonal, heads x heads blocks of rank x head_dim stored dense:
PEFT's format has no way to leave the zero blocks out), the merged
transformers export (every weight in the model's dtype) and the Kaggle bundle
(its adapter or merged model, and about 64 MiB of wheels). The data,
predictions and logs are small beside these and not counted.

finetune checks the plan before it trains: against `run.disk_limit_gib`
(Kaggle's 20 GB working folder, say), with what `run.disk_limit_folder`
already holds (there: the clone, its `.venv`, earlier runs), and against the
free space under the run's root, so that a run that cannot finish is told
before hours of training.

Example:
```python
plan = plan_disk(cfg, read_model_spec(cfg.model.preset))
print(plan.report())
```
"""

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.models.memory import (
    DTYPE_BYTES,
    GIB,
    LORA_DTYPE_BYTES,
    frozen_weight_bytes,
    lora_parameter_count,
)
from pipeline.models.model import PER_HEAD_INPUT

WHEELS_BYTES = 64 * 2**20  # the bundle's wheels (requirements-kaggle.txt), as measured


def peft_parameter_count(spec, lora_cfg):
    """Weights of the PEFT export: KerasHub's A factors as they are, and
    on q, k and v a dense B of (heads x head_dim) x (heads x rank)."""
    count = 0
    targets = spec.lora_targets(lora_cfg.target_layers)
    for path, dims in spec.weight_dims().items():
        name = path.split("/")[-2]
        if name not in targets:
            continue
        shape = [size for _, size in dims]
        count += int(np.prod(shape[:-1])) * lora_cfg.rank  # A
        heads = (
            next(size for field, size in dims if field.endswith("_heads"))
            if name in PER_HEAD_INPUT
            else 1
        )
        count += heads * shape[-1] * heads * lora_cfg.rank  # B (block-diagonal on q, k, v)
    return count


@dataclasses.dataclass
class DiskPlan:
    adapter: float
    checkpoint: float
    peft_export: float
    merged_export: float
    bundle: float
    kept_checkpoints: int = 2
    limit_gib: float = None

    @property
    def checkpoints(self):
        """The checkpoints on disk at a save: those kept and the new one."""
        return (self.kept_checkpoints + 1) * self.checkpoint

    @property
    def training(self):
        """What finetune writes: the adapter and the checkpoints."""
        return self.adapter + self.checkpoints

    @property
    def total(self):
        return self.training + self.peft_export + self.merged_export + self.bundle

    def report(self):
        rows = [
            ("adapter (finetune/adapter.lora.h5)", self.adapter),
            (
                f"checkpoints (finetune/checkpoints/; {self.kept_checkpoints} kept, +1 while "
                "saving)",
                self.checkpoints,
            ),
            ("PEFT export (export/peft_adapter)", self.peft_export),
            ("merged export (export/transformers)", self.merged_export),
            ("Kaggle bundle (kaggle_bundle/)", self.bundle),
            ("= the run", self.total),
        ]
        lines = ["disk plan (what the run writes under run.root)"]
        lines += [f"  {name:<60} {size / GIB:9.3f} GiB" for name, size in rows]
        if self.limit_gib:
            verdict = "fits" if self.total <= self.limit_gib * GIB else "does NOT fit"
            lines.append(f"  run.disk_limit_gib={self.limit_gib:g}: {verdict}")
        return "\n".join(lines)


def plan_disk(cfg, spec):
    lora_bytes = lora_parameter_count(spec, cfg.lora) * LORA_DTYPE_BYTES
    peft = (
        peft_parameter_count(spec, cfg.lora) * 4 if cfg.export.peft else 0.0
    )  # float32, as written
    merged = (
        frozen_weight_bytes(spec, {}, {}, DTYPE_BYTES[cfg.model.dtype])
        if cfg.export.merged
        else 0.0
    )
    shipped = merged if cfg.kaggle.base_model == "export" else peft
    return DiskPlan(
        adapter=lora_bytes,
        checkpoint=3 * lora_bytes,
        peft_export=peft,
        merged_export=merged,
        bundle=shipped + WHEELS_BYTES,
        kept_checkpoints=cfg.train.keep_checkpoints,
        limit_gib=cfg.run.disk_limit_gib,
    )


def folder_usage(folder):
    """Bytes of the files under `folder` (links not followed), per entry of
    `folder`; {} when there is no such folder."""
    if not folder or not Path(folder).is_dir():
        return {}
    usage = {}
    for entry in Path(folder).iterdir():
        if entry.is_symlink() or not entry.is_dir():
            usage[entry.name] = entry.lstat().st_size
            continue
        usage[entry.name] = sum(
            os.lstat(os.path.join(top, name)).st_size
            for top, _, names in os.walk(entry)
            for name in names
        )
    return usage


def _described(usage):
    largest = sorted(usage.items(), key=lambda item: -item[1])[:3]
    return ", ".join(f"{name} {size / GIB:.1f}" for name, size in largest)


def check_disk(plan, run_root, log=print, limit_folder=None):
    """Raises InputError when the run, with what `limit_folder` (the folder
    the limit caps) already holds, will not fit `run.disk_limit_gib`, or the
    free space under `run_root` leaves no room to train; warns when the
    exports will not fit the free space."""
    limit = plan.limit_gib
    advice = (
        "lower lora.rank, adapt fewer kernels (lora.target_layers), set export.merged=false (the "
        "Kaggle "
        "bundle needs only the PEFT adapter), or put run.root on a larger disk"
    )
    usage = folder_usage(limit_folder)
    held = sum(usage.values())
    if limit and held + plan.total > limit * GIB:
        already = (
            f"; {limit_folder} already holds {held / GIB:.1f} GiB ({_described(usage)}): move "
            "what need not be there out of it, e.g. the virtual environment "
            "(`make ... VENV=/tmp/prompt-recovery-venv`)"
            if held
            else ""
        )
        raise InputError(
            f"this run writes about {plan.total / GIB:.1f} GiB under {run_root} (adapter "
            f"{plan.adapter / GIB:.1f}, checkpoints {plan.checkpoints / GIB:.1f}, exports and "
            "bundle "
            f"{(plan.total - plan.training) / GIB:.1f}), more than run.disk_limit_gib={limit:g}"
            f"{already}; {advice}"
        )
    if held and limit:
        log(
            f"disk: {limit_folder} holds {held / GIB:.1f} GiB already ({_described(usage)}); with "
            f"the run's {plan.total / GIB:.1f} GiB that is within run.disk_limit_gib={limit:g}"
        )
    folder = Path(run_root)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if plan.training > free:
        raise InputError(
            f"finetune writes about {plan.training / GIB:.1f} GiB (adapter and checkpoints) but "
            f"{folder} has {free / GIB:.1f} GiB free; {advice}"
        )
    if plan.total > free:
        log(
            f"disk: the run's exports and bundle need about {plan.total / GIB:.1f} GiB in all, and "
            f"{folder} has "
            f"{free / GIB:.1f} GiB free: make room before `make export`"
        )
