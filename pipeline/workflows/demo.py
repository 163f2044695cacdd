"""The demo run: all stages on the embedded default, base vs fine-tuned.

Order: data, finetune, mean-prompt, predict + score (base model, then
fine-tuned), compare.

The honest learning check: the same holdout rows are predicted by the base
model and by base + adapter, scored with the same encoder, and both scores
are printed on lines starting `base model score:` and `fine-tuned score:`.

Example:
```python
run_demo(load_config())  # configs/cpu_tiny.yaml
```
"""

import dataclasses
from pathlib import Path

from pipeline.models.tiny import TINY_DIR, build_tiny_artifacts_for
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
    base_cfg = dataclasses.replace(
        cfg,
        predict=dataclasses.replace(cfg.predict, adapter="none", out=cfg.predict.out + "_base"),
        score=dataclasses.replace(cfg.score, out=cfg.score.out + "_base"),
    )
    scores = {}
    for label, run_cfg in (("base model", base_cfg), ("fine-tuned", cfg)):
        log(f"=== predict + score: {label} ===")
        run_predict_stage(run_cfg, log=log)
        scores[label] = run_score_stage(run_cfg, log=log)
    log("=== compare ===")
    run_compare_stage(cfg, log=log)
    log("=== result (holdout rows, same encoder) ===")
    for label, score in scores.items():
        log(f"{label} score: {score:.4f}")
    return scores
