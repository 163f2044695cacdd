"""The evaluate step: the adapter scored on rows whose prompts are known.

When predict's rows have true prompts (the run's own holdout rows, or a
`score.truth` file), evaluate scores predict's submission and compares the
ways of building the final prompt on it (the score and compare stages).
When they have none, as with the competition's test.csv, it predicts the
holdout rows of the training data into `<predict.out>_holdout/`, and scores
and compares those (`<score.out>_holdout/`, `<compare.out>_holdout/`), so a
run that ends in a submission also says how good its adapter is. `make all`
ends with it.

Example:
```python
cfg = load_config("configs/kaggle_tpu_v3_8.yaml")  # predict.input: test.csv
run_evaluate_stage(cfg)  # -> runs/kaggle_tpu_v3_8/score_holdout/score.json
```
"""

import dataclasses

from pipeline.parallel import hosts
from pipeline.run.run_dir import RunDir
from pipeline.stages.compare import run_compare_stage
from pipeline.stages.predict import run_predict_stage
from pipeline.stages.score import run_score_stage

HOLDOUT_SUFFIX = "_holdout"
# A submission CSV part covers the test ids only.
PARTS_OF_EVERY_ROW = ("model", "mean_prompt", "clustered_mean_prompt")


def holdout_config(cfg):
    """`cfg` for predicting, scoring and comparing the holdout rows of the
    training CSV, each stage in a folder of its own."""
    combine = [part for part in cfg.predict.combine if part in PARTS_OF_EVERY_ROW] or ["model"]
    return dataclasses.replace(
        cfg,
        predict=dataclasses.replace(
            cfg.predict,
            input=str(RunDir(cfg).train_csv),
            rows="holdout",
            combine=combine,
            out=cfg.predict.out + HOLDOUT_SUFFIX,
        ),
        score=dataclasses.replace(
            cfg.score, predictions=None, truth=None, out=cfg.score.out + HOLDOUT_SUFFIX
        ),
        compare=dataclasses.replace(cfg.compare, out=cfg.compare.out + HOLDOUT_SUFFIX),
    )


def run_evaluate_stage(cfg, log=print):
    """Returns the score of the rows it evaluated."""
    hosts.initialize(cfg.distribution)
    run = RunDir(cfg)
    if not hosts.share_from_main(run.truth_available):
        holdout = holdout_config(cfg)
        log(
            f"evaluate: {run.truth} has no rewrite_prompt column; predicting the holdout rows of "
            f"{holdout.predict.input} into {RunDir(holdout).submission.parent} to score the "
            "adapter there"
        )
        cfg = holdout
        run_predict_stage(cfg, log=log)
    score = run_score_stage(cfg, log=log)
    run_compare_stage(cfg, log=log)
    return score
