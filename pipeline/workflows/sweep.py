"""The sweep: finetune for every setting of a small grid, chosen between by
the validation score.

Write-ups of the competition disagree on what works (4th place: LoRA rank 2
to 4, higher ranks overfit; the reference notebook: rank 64), so the sweep
measures it on the user's data. Each combination of the grid's values is a
run of its own (`<run.name>-<setting>`, beside the base run), trained on the
base run's data CSV and scored as it trains on the validation rows
(`train.eval_rows`, `pipeline/stages/validation_score.py`): never on the
holdout rows, which stay for the final comparison. A finished setting is
not trained again (its `sweep_point.json` says what it was run with), and
an unfinished one resumes from its checkpoints. The base run's `sweep/`
folder gets the table (`sweep.csv`, `sweep.json`, best validation score
first) and one plot of every setting's validation score by step
(`sweep.png`).

Example:
```python
cfg = load_config("configs/kaggle_tpu_v5e_8.yaml")
run_sweep(cfg, {"lora.rank": [2, 4, 16, 64], "train.learning_rate": [1e-4, 2e-4]})
```
"""

import functools
import gc
import itertools
import json
import re

import pandas as pd

from pipeline.errors import InputError
from pipeline.parallel import hosts
from pipeline.run import plots
from pipeline.run.config import override_text, with_overrides
from pipeline.run.run_dir import RunDir
from pipeline.stages.data import run_data_stage
from pipeline.stages.finetune import run_finetune_stage

POINT_FILE = "sweep_point.json"


def grid_points(axes):
    """Every combination of the axes' values, as `key=value` overrides."""
    keys = list(axes)
    return [
        [override_text(key, value) for key, value in zip(keys, values, strict=True)]
        for values in itertools.product(*(axes[key] for key in keys))
    ]


def point_name(run_name, point):
    """`<run_name>-rank=2_learning_rate=0.0001`: the last part of each key."""
    parts = []
    for item in point:
        key, _, value = item.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return f"{run_name}-" + re.sub(r"[^A-Za-z0-9._=+-]+", "", "_".join(parts))


def point_configs(cfg, axes):
    """(point overrides, that run's config) for each setting, all validated
    before any work, and each run on the base run's data CSV."""
    if not axes:
        raise InputError(
            "sweep: no grid; give one or more key=[values] overrides, e.g. lora.rank=[2,4,16,64]"
        )
    data = str(RunDir(cfg).train_csv)
    configs = []
    for point in grid_points(axes):
        point_cfg = with_overrides(cfg, point)
        # Named by the values as the config took them (1e-4 -> 0.0001).
        point = [override_text(key, value_at(point_cfg, key)) for key in axes]
        point_cfg = with_overrides(
            point_cfg, [f"run.name={point_name(cfg.run.name, point)}", f"train.data={data}"]
        )
        if not point_cfg.train.eval_rows:
            raise InputError(
                "sweep: train.eval_rows is 0; the sweep compares settings by their validation "
                "score, so give it rows to score (e.g. train.eval_rows=64)"
            )
        configs.append((point, point_cfg))
    return configs


def value_at(cfg, key):
    """The value of a dotted key (`lora.rank`)."""
    return functools.reduce(getattr, key.split("."), cfg)


def run_sweep(cfg, axes, log=print):
    """Returns the table (a DataFrame, best validation score first)."""
    hosts.initialize(cfg.distribution)
    configs = point_configs(cfg, axes)
    log(f"sweep: {len(configs)} settings of {', '.join(axes)}")
    if not cfg.train.data:
        log("=== data ===")
        run_data_stage(cfg, log=log)
    rows, curves = [], {}
    for number, (point, point_cfg) in enumerate(configs, 1):
        setting = " ".join(point)
        log(f"=== sweep {number}/{len(configs)}: {setting} ===")
        result = train_point(point, point_cfg, log)
        rows.append({"setting": setting, **result["summary"]})
        curves[setting] = result["validation_score"]
    table = pd.DataFrame(rows).sort_values("best_validation_score", ascending=False, kind="stable")
    if hosts.is_main_process():
        write_results(cfg, table, curves, log)
    return table


def train_point(point, point_cfg, log):
    """The point's validation results, from its finished run or by training."""
    run = RunDir(point_cfg)
    marker = run.root / POINT_FILE
    done = hosts.share_from_main(
        lambda: json.loads(marker.read_text()) if marker.exists() else None
    )
    if done and done["overrides"] == point:
        log(f"sweep: {run.root} is done (its {POINT_FILE}); not trained again")
        return done
    run_finetune_stage(point_cfg, log=log)
    gc.collect()  # the model of this setting, before the next one loads
    result = hosts.share_from_main(lambda: point_result(point, point_cfg))
    if hosts.is_main_process():
        marker.write_text(json.dumps(result, indent=2))
    return result


def point_result(point, point_cfg):
    history_path = RunDir(point_cfg).root / point_cfg.train.out / "history.json"
    history = json.loads(history_path.read_text())
    evaluations, best = history["validation_score"], history["best"]
    if not evaluations:
        raise InputError(
            f"sweep: {history_path} holds no validation score; the split needs validation "
            "rows (split.validation)"
        )
    return {
        "overrides": point,
        "validation_score": evaluations,
        "summary": {
            "best_validation_score": best["score"],
            "best_step": best["step"],
            "last_validation_score": evaluations[-1]["score"],
            "steps": len(history["step_loss"]),
            "last_loss": history["step_loss"][-1],
            "run": str(RunDir(point_cfg).root),
        },
    }


def write_results(cfg, table, curves, log):
    folder = RunDir(cfg).root / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "sweep.csv", index=False)
    (folder / "sweep.json").write_text(
        json.dumps({"table": table.to_dict("records"), "curves": curves}, indent=2)
    )
    plots.sweep_curves(curves, folder / "sweep.png")
    width = max(len(setting) for setting in table["setting"])
    log(f"sweep: validation score (train.eval_rows={cfg.train.eval_rows}), best first:")
    for row in table.itertuples():
        log(
            f"  {row.setting:<{width}}  best {row.best_validation_score:.4f} at step "
            f"{row.best_step}, last {row.last_validation_score:.4f}"
        )
    log(f"sweep: -> {folder / 'sweep.csv'}, {folder / 'sweep.png'}")
