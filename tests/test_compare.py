"""compare over the variants a run produced: each forced opening's answers,
other predict runs' outputs, and a named best that picks nothing."""

import pandas as pd
import pytest

from pipeline.run.run_dir import RunDir
from pipeline.stages.compare import run_compare_stage
from pipeline.stages.data import run_data_stage
from pipeline.stages.mean_prompt import run_mean_prompt_stage
from pipeline.stages.predict import run_predict_stage
from pipeline.text.encoder import load_sentence_encoder, score_prompts


@pytest.mark.slow
def test_compare_scores_each_opening_and_other_outputs_and_names_the_best(tiny_cfg):
    cfg = tiny_cfg
    cfg.data.max_rows, cfg.mean_prompt.steps, cfg.mean_prompt.clusters = 48, 2, 0
    cfg.predict.adapter, cfg.predict.max_new_tokens = "none", 3
    quiet = dict(log=lambda *_: None)
    run_data_stage(cfg, **quiet)
    run_mean_prompt_stage(cfg, **quiet)
    cfg.predict.out = "predict_plain"
    run_predict_stage(cfg, **quiet)
    plain = RunDir(cfg).raw_outputs
    cfg.predict.out, cfg.predict.openings = "predict", ["Rewrite", "Make this text"]
    run_predict_stage(cfg, **quiet)
    other_mean = RunDir(cfg).root / "mean_prompt_other" / "mean_prompt.txt"
    other_mean.parent.mkdir()
    other_mean.write_text("Rewrite this text.\n")
    cfg.compare.alternatives = [str(plain), str(other_mean)]
    logs = []
    scores = run_compare_stage(cfg, log=logs.append)
    assert {
        "model, opening 'Rewrite' only",
        "model, opening 'Make this text' only",
        "predict_plain",
        "predict_plain + mean prompt",
        "mean_prompt_other",
        "model + mean_prompt_other",
        "model",
    } <= set(scores)
    run = RunDir(cfg)
    rows = run.read_predict_rows(log=lambda *_: None)
    truth = pd.read_csv(run.truth).set_index("id").loc[rows["id"], "rewrite_prompt"]
    answers = pd.read_csv(run.outputs_by_opening, keep_default_na=False).set_index("id")
    encoder = load_sentence_encoder(cfg.score.encoder)
    rewrite = score_prompts(encoder, list(answers.loc[rows["id"], "Rewrite"]), list(truth)).mean()
    assert scores["model, opening 'Rewrite' only"] == pytest.approx(rewrite, abs=1e-6)
    best = max(scores, key=scores.get)
    assert f"compare: best on these holdout rows: {best}." in logs[-1]
    cfg.predict.openings = []
    run_predict_stage(cfg, **quiet)  # no openings now: no former answers left to compare
    assert not run.outputs_by_opening.exists()
