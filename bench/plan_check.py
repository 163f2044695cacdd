"""Benchmark (not a test): the memory plan against XLA for the model table's
real architectures, compiled from shapes on virtual CPU devices.

For every row of the model table (docs/models.md) that a target machine
holds ("yes, [data, model]"), the finetune stage's training step and the
predict stage's decoding call of that architecture are lowered with
`jax.ShapeDtypeStruct` arguments on that mesh and compiled
(`pipeline.models.compiled_memory`). XLA's per-device bytes are printed
beside the plan's (`make memory-plan`), with their ratio, and the
collectives of each program. A model is compiled at 2 and 4 layers and
drawn on to its depth (bytes and collectives grow by layer); Gemma 4, whose
blocks differ, at one block of each kind and one more of each kind in turn
(`figures_at_full_depth`).

Each row is compiled twice. In float32, where XLA's CPU compiler computes
what a TPU does, the plan's figure must be within 15% of XLA's. In the
target's own dtype (bfloat16), XLA's CPU figure must fit what the plan
allows of the device: there the CPU compiler widens bfloat16 products to
float32 and keeps float32 copies of the weights they read, which a TPU
does not, so this figure is above what the TPU will hold, and a row that
fits by it fits. A float16 target (2 x T4) has the float32 check only:
the CPU compiler refuses some float16 products with float32 sums
(Mistral's attention), and its float32 copies of the weights, twice their
float16 size, would swamp a figure of the GPU's. Writes bench/results/plan_check.json.

    make plan-check                                      # every target, every row
    make plan-check ARGS="--target 'TPU v3-8' --family mistral --architecture mistral_7b"
"""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.15


def rows_that_fit(target, families, architectures):
    """(row, mesh) of each architecture the model table says `target` holds."""
    from pipeline.models.model_table import TARGET_CONFIGS, model_table
    from pipeline.run.config import load_config

    cfg = load_config(ROOT / TARGET_CONFIGS[target])
    for row in model_table({target: cfg}):
        fits = row.fits[target]
        chosen = (not families or row.family in families) and (
            not architectures or row.architecture in architectures
        )
        if fits.startswith("yes") and chosen:
            yield cfg, row, json.loads(fits.removeprefix("yes, "))


def check_target(target, families, architectures):
    """Compiles and prints the target's rows; returns them as dicts."""
    from pipeline.models.compiled_memory import GIB, figures_at_full_depth
    from pipeline.models.families.family import ModelSpec
    from pipeline.models.families.registry import FAMILIES
    from pipeline.models.memory import plan_memory

    results = []
    print(
        f"\n{target}: plan / XLA per device (GiB), training step and decoding call; "
        "float32 (the plan's check), then the target's dtype (XLA's CPU figure: the fit check)"
    )
    for cfg, row, mesh in rows_that_fit(target, families, architectures):
        cfg = on_mesh(cfg, mesh)
        spec = ModelSpec(FAMILIES[row.family], FAMILIES[row.family].architectures[row.architecture])
        started = time.perf_counter()
        wide = with_dtype(cfg, "float32")
        xla, plan = figures_at_full_depth(wide, spec), plan_memory(wide, spec)
        narrow, narrow_plan = xla, plan_memory(cfg, spec)
        if cfg.model.dtype == "float16":
            narrow = None  # the fit check is bfloat16's (the module's docstring)
        elif cfg.model.dtype != "float32":
            narrow = figures_at_full_depth(cfg, spec)
        result = dict(
            target=target,
            architecture=row.architecture,
            mesh=mesh,
            budget_gib=plan.budget / GIB,
            plan_training_gib=plan.training / GIB,
            xla_training_gib=xla.training_bytes / GIB,
            plan_generation_gib=plan.generation / GIB,
            xla_generation_gib=xla.generation_bytes / GIB,
            dtype=cfg.model.dtype,
            plan_training_dtype_gib=narrow_plan.training / GIB,
            xla_cpu_training_dtype_gib=narrow and narrow.training_bytes / GIB,
            plan_generation_dtype_gib=narrow_plan.generation / GIB,
            xla_cpu_generation_dtype_gib=narrow and narrow.generation_bytes / GIB,
            training_collectives=xla.training_collectives,
            generation_collectives=xla.generation_collectives,
            compiled_depths=list(xla.depths),
            seconds=round(time.perf_counter() - started),
        )
        result["ratios"] = [
            result["plan_training_gib"] / result["xla_training_gib"],
            result["plan_generation_gib"] / result["xla_generation_gib"],
        ]
        result["within"] = all(abs(r - 1) <= TOLERANCE for r in result["ratios"])
        result["xla_fits"] = (
            narrow is None or max(narrow.training_bytes, narrow.generation_bytes) <= plan.budget
        )
        print(line(result), flush=True)
        results.append(result)
    return results


def with_dtype(cfg, dtype):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))


def on_mesh(cfg, mesh):
    """`cfg` on `mesh`, each batch the rows per device the plan counts
    (at least one) times the data axis: a batch must divide by it."""
    rows = lambda stage: dataclasses.replace(  # noqa: E731
        stage, batch_size=max(1, stage.batch_size // mesh[0]) * mesh[0]
    )
    return dataclasses.replace(
        cfg,
        distribution=dataclasses.replace(cfg.distribution, mesh_shape=mesh),
        train=rows(cfg.train),
        predict=rows(cfg.predict),
    )


def dtype_check(r):
    if r["xla_cpu_training_dtype_gib"] is None:
        return (
            f"{r['dtype']}: not compiled (XLA's CPU compiler refuses float16 products with "
            f"float32 sums); plan train {r['plan_training_dtype_gib']:.2f} generate "
            f"{r['plan_generation_dtype_gib']:.2f}, budget {r['budget_gib']:.2f}"
        )
    return (
        f"{r['dtype']}: train {r['plan_training_dtype_gib']:6.2f} / "
        f"{r['xla_cpu_training_dtype_gib']:6.2f}  generate "
        f"{r['plan_generation_dtype_gib']:6.2f} / {r['xla_cpu_generation_dtype_gib']:6.2f}  "
        f"budget {r['budget_gib']:.2f}"
        f"{'' if r['xla_fits'] else '  XLA EXCEEDS THE DEVICE'}"
    )


def line(r):
    def collectives(counts):
        return " ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "none"

    return (
        f"  {r['architecture']:<16} [{r['mesh'][0]},{r['mesh'][1]}]  float32: "
        f"train {r['plan_training_gib']:6.2f} / {r['xla_training_gib']:6.2f} "
        f"({r['ratios'][0]:.2f})  "
        f"generate {r['plan_generation_gib']:6.2f} / {r['xla_generation_gib']:6.2f} "
        f"({r['ratios'][1]:.2f})"
        f"{'' if r['within'] else '  PLAN OFF BY >15%'}\n"
        f"    {dtype_check(r)}\n"
        f"    collectives per training step: {collectives(r['training_collectives'])}; "
        f"per decoding call: {collectives(r['generation_collectives'])}"
        f"  [{r['seconds']} s]"
    )


def main():
    from pipeline.models.model_table import TARGET_CONFIGS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=list(TARGET_CONFIGS), action="append")
    parser.add_argument("--family", action="append", help="only these families")
    parser.add_argument("--architecture", action="append", help="only these architectures")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan_check.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # where one target's rows go
    args = parser.parse_args()
    targets = args.target or list(TARGET_CONFIGS)
    if args.child:  # one target, on its own number of virtual devices
        rows = check_target(targets[0], args.family or [], args.architecture or [])
        Path(args.child).write_text(json.dumps(rows))
        return
    results = []
    for target in targets:
        results += run_child(target, args.family or [], args.architecture or [])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    off = [r["architecture"] for r in results if not r["within"]]
    over = [r["architecture"] for r in results if not r["xla_fits"]]
    print(
        f"\n{len(results)} rows; plan off by more than 15%: {off or 'none'}; "
        f"XLA over the device: {over or 'none'} -> {args.out}"
    )


def run_child(target, families, architectures):
    """Runs `target` in a process with as many virtual devices as its
    machine has (the mesh must use them all); its rows come back as JSON."""
    from pipeline.models.model_table import TARGET_CONFIGS
    from pipeline.run.config import load_config

    mesh = load_config(ROOT / TARGET_CONFIGS[target]).distribution.mesh_shape
    with tempfile.TemporaryDirectory() as folder:
        rows = Path(folder) / "rows.json"
        command = [sys.executable, __file__, "--child", str(rows), "--target", target]
        for family in families:
            command += ["--family", family]
        for architecture in architectures:
            command += ["--architecture", architecture]
        # This process's virtual device count must not reach the child's XLA_FLAGS.
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ["XLA_FLAGS"])
        env = dict(os.environ, PLAN_CHECK_DEVICES=str(mesh[0] * mesh[1]), XLA_FLAGS=flags.strip())
        if subprocess.run(command, env=env, check=False).returncode:
            sys.exit(f"plan-check: {target} failed (above)")
        return json.loads(rows.read_text())


if __name__ == "__main__":
    from pipeline.parallel.runtime import setup_environment
    from pipeline.run.config import DistributionConfig

    setup_environment(
        DistributionConfig(host_device_count=int(os.environ.get("PLAN_CHECK_DEVICES", 8)))
    )
    main()
