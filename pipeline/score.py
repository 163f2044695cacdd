"""The score stage: the competition metric.

Predicted and true prompts are embedded with sentence-t5 (the TF Hub
SavedModel the competition used), L2-normalised, and each row scores the
sharpened cosine similarity `cos**3`; the score is the mean over rows.

Example:
```python
encoder = load_sentence_encoder("https://tfhub.dev/google/sentence-t5/st5-base/1")
vectors = embed(encoder, ["Improve the text to this."])
sharpened_cosine(vectors, vectors)  # array([1.])
```
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import hosts, plots
from pipeline.run_dir import RunDir
from pipeline.tables import SUBMISSION_COLUMNS, TableError, read_table, split_rows


def encoder_folder(handle):
    """The local folder of the encoder: a TF Hub URL (downloaded to TF Hub's
    cache), a Kaggle Models handle (downloaded by kagglehub) or a folder."""
    handle = str(handle)
    if Path(handle).is_dir():
        return Path(handle)
    if handle.startswith(("http://", "https://")):
        import tensorflow_hub as hub

        return Path(hub.resolve(handle))
    kaggle_handle = handle.removeprefix("kaggle://")
    if kaggle_handle.count("/") >= 3:  # owner/model/framework/variation[/version]
        import kagglehub

        return Path(kagglehub.model_download(kaggle_handle))
    raise ValueError(
        f"score.encoder {handle!r}: not a URL, an existing folder, or a Kaggle Models "
        "handle such as google/sentence-t5/tensorFlow2/st5-base"
    )


def load_sentence_encoder(handle):
    """A TF Hub URL, a Kaggle Models handle or a local SavedModel folder."""
    import tensorflow_hub as hub
    import tensorflow_text  # noqa: F401  registers the SentencePiece op

    return hub.load(str(encoder_folder(handle)))


def embed(encoder, texts, batch_size=64):
    """[N, D] unit vectors."""
    import tensorflow as tf

    parts = []
    for start in range(0, len(texts), batch_size):
        out = encoder(tf.constant(list(texts[start : start + batch_size])))
        out = out[0] if isinstance(out, (list, tuple)) else out
        parts.append(np.asarray(out, dtype="float64"))
    vectors = np.concatenate(parts) if parts else np.zeros((0, 1))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)


def sharpened_cosine(a, b):
    """Row-wise cos**3 of two [N, D] arrays (normalised here)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return np.sum(a * b, axis=1) ** 3


def score_prompts(encoder, predicted, truth, batch_size=64):
    """Per-row sharpened cosine similarity of two lists of prompts."""
    return sharpened_cosine(embed(encoder, predicted, batch_size), embed(encoder, truth, batch_size))


def run_score_stage(cfg, log=print):
    run = RunDir(cfg)
    stage_dir = run.start_stage(cfg, cfg.score.out)
    if not hosts.is_main_process():
        return None  # no accelerator work: process 0 does this stage alone
    predictions = read_table(run.predictions, SUBMISSION_COLUMNS, ["rewrite_prompt"], empty="error", log=log)
    truth = read_table(run.truth, ["id", "rewrite_prompt"], ["rewrite_prompt"], empty="error", log=log)
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
        encoder, list(merged["rewrite_prompt_predicted"]), list(merged["rewrite_prompt_true"]), cfg.score.batch_size
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
    result = {"score": mean, "rows": len(merged), "predictions": str(run.predictions), "encoder": cfg.score.encoder}
    (stage_dir / "score.json").write_text(json.dumps(result, indent=2))
    plots.score_histogram(scores, mean, stage_dir / "histogram.png")
    log(f"score: {mean:.4f} over {len(merged)} rows -> {stage_dir / 'score.json'}")
    return mean
