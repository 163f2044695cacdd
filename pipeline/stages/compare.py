"""The compare report: each way of building the final prompt, side by side.

Scores on the same rows (the predict stage's rows and ids): a constant
baseline, the mean prompt, the model's own output, and the model output
joined with the mean prompt in both orders; with the mean-prompt stage's
clusters, each row's cluster's mean prompt (by its model output) alone and
after the model output; with forced openings, each opening's answers alone
(the model variant being their concatenation); and each of
`compare.alternatives`: another predict run's outputs (e.g. the best
adapter's) alone and with the mean prompt, or another mean prompt (e.g. the
combined objective's) alone and after the model. Prints a table (naming
the best, and leaving the choice to the user), writes `compare.json` and a
bar chart `compare.png`, so a user can pick what to submit.

Example:
```python
scores = run_compare_stage(cfg)  # after predict and mean-prompt
```
"""

import json
from pathlib import Path

import pandas as pd

from pipeline.parallel import hosts
from pipeline.run import plots
from pipeline.run.run_dir import RunDir, pushes_run
from pipeline.text.clusters import MeanPromptClusters
from pipeline.text.combine import combine_parts, load_parts
from pipeline.text.encoder import encoder_token_limit, load_sentence_encoder, score_prompts
from pipeline.text.tables import SUBMISSION_COLUMNS, read_table

CONSTANT_BASELINE = "Improve the text to this."

VARIANTS = {
    f"constant: {CONSTANT_BASELINE}": ["constant"],
    "mean prompt": ["mean_prompt"],
    "model": ["model"],
    "model + mean prompt": ["model", "mean_prompt"],
    "mean prompt + model": ["mean_prompt", "model"],
    # Each row's cluster's mean prompt, by its model output (mean_prompt.clusters).
    "clustered mean prompt": ["clustered_mean_prompt"],
    "model + clustered mean prompt": ["model", "clustered_mean_prompt"],
}


@pushes_run
def run_compare_stage(cfg, log=print):
    run = RunDir(cfg)
    stage_dir = run.start_stage(cfg, cfg.compare.out)
    # No accelerator work: process 0 compares alone, the other hosts wait for it.
    return hosts.share_from_main(lambda: compare_variants(cfg, run, stage_dir, log))


def compare_variants(cfg, run, stage_dir, log):
    run.check_truth_available()
    rows = run.read_predict_rows(log)
    truth = read_table(run.truth, ["id", "rewrite_prompt"], ["rewrite_prompt"], log=log).set_index(
        "id"
    )
    ids = list(rows["id"])
    model = read_table(run.raw_outputs, SUBMISSION_COLUMNS, empty="keep", log=log).set_index("id")
    model_outputs = list(model["rewrite_prompt"].reindex(ids, fill_value=""))
    available = {"constant": [CONSTANT_BASELINE] * len(ids), "model": model_outputs}
    variants = dict(VARIANTS)
    if run.outputs_by_opening.exists():  # each forced opening's answers alone
        by_opening = pd.read_csv(run.outputs_by_opening, dtype=str, keep_default_na=False)
        by_opening = by_opening.set_index("id")
        for opening in by_opening.columns:
            available[f"opening {opening}"] = list(by_opening[opening].reindex(ids, fill_value=""))
            variants[f"model, opening {opening!r} only"] = [f"opening {opening}"]
    for path in map(Path, cfg.compare.alternatives):
        name = path.parent.name
        if path.suffix == ".txt":  # another mean prompt
            available[name] = load_parts(["mean_prompt"], ids, path)[0]
            variants[name], variants[f"model + {name}"] = [name], ["model", name]
        else:  # another predict run's outputs
            available[name] = load_parts([str(path)], ids, run.mean_prompt)[0]
            variants[name], variants[f"{name} + mean prompt"] = [name], [name, "mean_prompt"]
    if run.mean_prompt.exists():
        available["mean_prompt"] = load_parts(["mean_prompt"], ids, run.mean_prompt)[0]
    else:
        log(f"compare: {run.mean_prompt} not found; mean-prompt variants left out")
    encoder = load_sentence_encoder(cfg.score.encoder)
    if run.mean_prompt_clusters.exists():
        available["clustered_mean_prompt"] = MeanPromptClusters.load(
            run.mean_prompt_clusters
        ).for_outputs(encoder, model_outputs, cfg.score.batch_size)
    cut = encoder_token_limit(cfg)
    true_prompts = list(truth["rewrite_prompt"].loc[ids])
    scores = {}
    for name, part_names in variants.items():
        if all(p in available for p in part_names):
            prompts, _ = combine_parts(
                [available[p] for p in part_names], cfg.predict.separator, cfg.predict.fallback, cut
            )
            scores[name] = float(
                score_prompts(encoder, prompts, true_prompts, cfg.score.batch_size).mean()
            )
    width = max(map(len, scores))
    log(f"compare: {len(ids)} rows ({cfg.predict.rows})")
    for name, score in sorted(scores.items(), key=lambda kv: -kv[1]):
        log(f"  {name:<{width}}  {score:.4f}")
    best = max(scores, key=scores.get)
    log(
        f"compare: best on these {cfg.predict.rows} rows: {best}. The choice is yours: "
        "a choice made on these rows makes their score of it optimistic; choose on "
        "validation rows (make sweep) where that matters"
    )
    (stage_dir / "compare.json").write_text(
        json.dumps({"rows": len(ids), "scores": scores}, indent=2)
    )
    plots.variant_bars(scores, stage_dir / "compare.png")
    return scores
