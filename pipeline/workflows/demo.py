"""The demo run: all stages on the embedded default, base vs fine-tuned.

Order: data, finetune, mean-prompt, predict + score (base model, the best
adapter by the validation score where it is not the last step's, then the
fine-tuned adapter of the last step), compare.

The honest learning check: the same holdout rows are predicted by the base
model and by base + adapter, scored with the same encoder, and the scores
are printed on lines starting `base model score:`, `best adapter (step N)
score:` and, last, `fine-tuned score:`, after the validation scores the
finetune stage logged as it trained (plotted in `finetune/loss_curve.png`).

Example:
```python
run_demo(load_config())  # configs/cpu_tiny.yaml
```
"""

import dataclasses
import json
from pathlib import Path

from pipeline.models.tiny import TINY_DIR, build_tiny_artifacts_for
from pipeline.run.run_dir import RunDir
from pipeline.stages.compare import run_compare_stage
from pipeline.stages.data import run_data_stage
from pipeline.stages.finetune import run_finetune_stage
from pipeline.stages.mean_prompt import run_mean_prompt_stage
from pipeline.stages.predict import run_predict_stage
from pipeline.stages.score import run_score_stage


def run_demo(cfg, log=print):
    if Path(cfg.model.preset).is_relative_to(TINY_DIR):
        build_tiny_artifacts_for(cfg.model.preset, log=log)
    stages = (
        ("data", run_data_stage),
        ("finetune", run_finetune_stage),
        ("mean-prompt", run_mean_prompt_stage),
    )
    for name, stage in stages:
        log(f"=== {name} ===")
        stage(cfg, log=log)
    variants = [("base model", variant(cfg, "none", "_base"))]
    best = best_before_the_end(cfg, log)
    best_cfg = best and variant(cfg, "best", "_best")
    if best:
        variants.append((f"best adapter (step {best['step']})", best_cfg))
    variants.append(("fine-tuned", cfg))
    scores = {}
    for label, run_cfg in variants:
        log(f"=== predict + score: {label} ===")
        run_predict_stage(run_cfg, log=log)
        scores[label] = run_score_stage(run_cfg, log=log)
    log("=== compare ===")
    if best:  # the best adapter's outputs beside the last one's
        best_outputs = str(RunDir(best_cfg).raw_outputs)
        cfg = dataclasses.replace(
            cfg, compare=dataclasses.replace(cfg.compare, alternatives=[best_outputs])
        )
    run_compare_stage(cfg, log=log)
    log("=== result (holdout rows, same encoder) ===")
    for label, score in scores.items():
        log(f"{label} score: {score:.4f}")
    return scores


def variant(cfg, adapter, suffix):
    """`cfg` predicting with `adapter` into folders of their own."""
    return dataclasses.replace(
        cfg,
        predict=dataclasses.replace(cfg.predict, adapter=adapter, out=cfg.predict.out + suffix),
        score=dataclasses.replace(cfg.score, out=cfg.score.out + suffix),
    )


def best_before_the_end(cfg, log):
    """Logs the validation scores of the finetune stage; returns the best
    one ({"step", "score"}) where it came before the last step, else None."""
    history = json.loads((RunDir(cfg).root / cfg.train.out / "history.json").read_text())
    evaluations = history.get("validation_score") or []
    if not evaluations:
        return None
    curve = ", ".join(f"step {e['step']}: {e['score']:.4f}" for e in evaluations)
    log(f"validation score by step ({cfg.train.out}/loss_curve.png): {curve}")
    best = history["best"]
    return best if best["step"] != len(history["step_loss"]) else None
