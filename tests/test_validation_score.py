"""Validation by the metric while training: the best adapter is the argmax
of the logged scores and scores what was logged, evaluating leaves training
alone, early stopping stops where it says and stays stopped."""

import json

import numpy as np
import pytest
from processes import tiny_config
from test_pod import lora_weights

from pipeline.parallel.checkpoint import Progress
from pipeline.run.config import TrainConfig
from pipeline.run.run_dir import RunDir
from pipeline.stages.data import run_data_stage
from pipeline.stages.finetune import run_finetune_stage
from pipeline.stages.validation_score import ValidationTracking, best_evaluation

SETTINGS = ["data.max_rows=64", "split.validation=0.15", "train.epochs=2", "train.eval_every=2"]


class ListedScores:
    """A scorer that returns the given scores in turn."""

    rows = 4

    def __init__(self, scores):
        self.scores = iter(scores)

    def __call__(self):
        return next(self.scores)


def test_tracking_keeps_the_first_best_and_goes_stale_after_early_stop_evaluations():
    progress, saved = Progress(), []
    tracking = ValidationTracking(
        ListedScores([0.1, 0.3, 0.2, 0.3, 0.1]),
        progress,
        TrainConfig(eval_every=1, early_stop=2),
        steps_per_epoch=100,
        save_best=lambda step, score: saved.append((step, score)),
        log=lambda line: None,
    )
    stale = []
    for step in range(1, 6):
        progress.step = step
        tracking.evaluate()
        tracking.evaluate()  # a second call at the same step scores nothing
        stale.append(tracking.stale)
    assert [e["step"] for e in progress.evaluations] == [1, 2, 3, 4, 5]
    assert saved == [(1, 0.1), (2, 0.3)]  # an equal later score is no gain
    assert best_evaluation(progress.evaluations) == {"step": 2, "score": 0.3}
    assert stale == [False, False, False, True, True]


def config(tiny, root, *overrides):
    return tiny_config(tiny, root, [*SETTINGS, *overrides])


@pytest.fixture(scope="module")
def trained_runs(tiny, tmp_path_factory):
    """(cfg, run folder, finetune's log) of the tiny run evaluated every 2
    steps, beside a copy trained with no evaluation (finetune_plain/)."""
    root = tmp_path_factory.mktemp("validation")
    cfg = config(tiny, root)
    quiet = dict(log=lambda *_: None)
    run_data_stage(cfg, **quiet)
    logs = []
    run_finetune_stage(cfg, log=logs.append)
    run_finetune_stage(config(tiny, root, "train.eval_rows=0", "train.out=finetune_plain"), **quiet)
    return cfg, root / cfg.run.name, logs


@pytest.mark.slow
def test_the_best_adapter_is_the_argmax_of_the_logged_scores(trained_runs, tiny):
    cfg, run, logs = trained_runs
    history = json.loads((run / "finetune" / "history.json").read_text())
    evaluations = history["validation_score"]
    steps = len(history["step_loss"])
    # Every 2 steps and at each epoch's end, once per step.
    assert [e["step"] for e in evaluations] == sorted(
        set(range(2, steps + 1, 2)) | {steps // 2, steps}
    )
    best = json.loads((run / "finetune" / "best.json").read_text())
    scores = [e["score"] for e in evaluations]
    assert best["validation_score"] == max(scores) == history["best"]["score"]
    assert best["step"] == evaluations[int(np.argmax(scores))]["step"] == history["best"]["step"]
    assert best["rank"] == cfg.lora.rank and best["template"] == cfg.train.template
    assert len(set(scores)) > 1  # the scores moved as the model trained
    assert any(f"step {steps}, validation score" in line for line in logs)
    best_run = RunDir(config(tiny, run.parent, "predict.adapter=best"))
    assert best_run.predict_adapter == run / "finetune" / "best.lora.h5"


@pytest.mark.slow
def test_the_best_adapter_scores_what_was_logged(trained_runs, tiny):
    from pipeline.models.model import load_adapter, load_model
    from pipeline.stages.finetune import load_splits
    from pipeline.stages.validation_score import ValidationScorer

    cfg, run, _ = trained_runs
    best = json.loads((run / "finetune" / "best.json").read_text())
    causal_lm, tokenizer = load_model(cfg, [cfg.train.batch_size])
    load_adapter(causal_lm, run / "finetune" / "best.lora.h5", cfg.model.preset)
    _, validation = load_splits(RunDir(cfg).train_csv, cfg.split, log=lambda *_: None)
    scorer = ValidationScorer(causal_lm, tokenizer, cfg, validation)
    assert scorer.rows == min(cfg.train.eval_rows, len(validation)) > 4
    assert scorer() == pytest.approx(best["validation_score"], abs=1e-5)
    # With forced openings it scores what predict writes: each opening's answer, joined.
    opened = config(tiny, run.parent, "predict.openings=[Rewrite,Make this]")
    predicted = ValidationScorer(causal_lm, tokenizer, opened, validation).predicted()
    assert all(p.startswith("Rewrite") and " Make this" in p for p in predicted), predicted


@pytest.mark.slow
def test_evaluating_leaves_the_training_alone(trained_runs):
    _, run, _ = trained_runs
    evaluated = lora_weights(run / "finetune" / "adapter.lora.h5")
    plain = lora_weights(run / "finetune_plain" / "adapter.lora.h5")
    assert evaluated.keys() == plain.keys()
    for name in evaluated:
        np.testing.assert_array_equal(evaluated[name], plain[name], err_msg=name)
    assert not (run / "finetune_plain" / "best.lora.h5").exists()


@pytest.mark.slow
def test_early_stop_ends_training_and_a_rerun_stays_stopped(trained_runs, tiny):
    cfg, run, _ = trained_runs
    early = config(
        tiny,
        run.parent,
        "train.epochs=3",
        "train.eval_every=1",
        "train.early_stop=2",
        "train.out=finetune_early",
    )
    logs = []
    run_finetune_stage(early, log=logs.append)
    history = json.loads((run / "finetune_early" / "history.json").read_text())
    evaluations, steps = history["validation_score"], len(history["step_loss"])
    best_at = evaluations.index(history["best"])
    assert steps == evaluations[-1]["step"] < 3 * steps_per_epoch(logs)  # stopped early
    assert len(evaluations) - 1 - best_at == 2  # exactly early_stop evaluations after the best
    rerun = []
    run_finetune_stage(early, log=rerun.append)
    assert any(f"stopped early at step {steps}" in line for line in rerun)
    assert not any(", validation score " in line for line in rerun)  # nothing trained or scored
    again = json.loads((run / "finetune_early" / "history.json").read_text())
    assert again["step_loss"] == history["step_loss"]


def steps_per_epoch(logs):
    line = next(line for line in logs if "steps per epoch" in line)
    return int(line.split("finetune: ")[1].split(" steps per epoch")[0])
