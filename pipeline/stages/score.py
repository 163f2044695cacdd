"""The score stage: the competition metric over a submission.

Each predicted prompt is scored against the true one with the sentence
encoder's sharpened cosine similarity (`pipeline/text/encoder.py`); the score
is the mean over rows. Writes `score.json`, `per_row.csv` and a histogram.

Example:
```python
cfg = load_config("configs/cpu_tiny.yaml", ["score.predictions=sub.csv", "score.truth=train.csv"])
mean = run_score_stage(cfg)
```
"""

import json

import pandas as pd

from pipeline.parallel import hosts
from pipeline.run import plots
from pipeline.run.run_dir import RunDir, pushes_run
from pipeline.text.encoder import load_sentence_encoder, score_prompts
from pipeline.text.tables import SUBMISSION_COLUMNS, TableError, read_table, split_rows


@pushes_run
def run_score_stage(cfg, log=print):
    run = RunDir(cfg)
    stage_dir = run.start_stage(cfg, cfg.score.out)
    # No accelerator work: process 0 scores alone, the other hosts wait for it.
    return hosts.share_from_main(lambda: score_submission(cfg, run, stage_dir, log))


def score_submission(cfg, run, stage_dir, log):
    run.check_truth_available()
    predictions = read_table(
        run.predictions, SUBMISSION_COLUMNS, ["rewrite_prompt"], empty="error", log=log
    )
    truth = read_table(
        run.truth, ["id", "rewrite_prompt"], ["rewrite_prompt"], empty="error", log=log
    )
    merged = predictions.merge(truth, on="id", how="left", suffixes=("_predicted", "_true"))
    missing = merged["rewrite_prompt_true"].isna()
    if missing.any():
        raise TableError(
            f"{run.predictions}: row {int(missing.idxmax()) + 1}, column 'id': id "
            f"{merged['id'][missing.idxmax()]!r} is not in {run.truth}"
        )
    if run.truth == run.predict_input and cfg.predict.rows == "holdout":
        _, _, holdout = split_rows(len(truth), cfg.split)  # the rows predict predicted
        truth = truth.iloc[list(holdout)]
    absent = ~truth["id"].isin(predictions["id"])
    if absent.any():
        raise TableError(
            f"{run.predictions}: no prediction for {int(absent.sum())} id(s) of {run.truth} "
            f"(first: {truth['id'][absent].iloc[0]!r}); a submission needs a row for every id"
        )
    encoder = load_sentence_encoder(cfg.score.encoder)
    scores = score_prompts(
        encoder,
        list(merged["rewrite_prompt_predicted"]),
        list(merged["rewrite_prompt_true"]),
        cfg.score.batch_size,
    )
    mean = float(scores.mean())
    pd.DataFrame(
        {
            "id": merged["id"],
            "predicted": merged["rewrite_prompt_predicted"],
            "true": merged["rewrite_prompt_true"],
            "score": scores,
        }
    ).to_csv(stage_dir / "per_row.csv", index=False)
    result = {
        "score": mean,
        "rows": len(merged),
        "predictions": str(run.predictions),
        "encoder": cfg.score.encoder,
    }
    (stage_dir / "score.json").write_text(json.dumps(result, indent=2))
    plots.score_histogram(scores, mean, stage_dir / "histogram.png")
    log(f"score: {mean:.4f} over {len(merged)} rows -> {stage_dir / 'score.json'}")
    return mean
