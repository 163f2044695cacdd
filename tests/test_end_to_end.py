"""All stages on the embedded default, as `make demo` runs them."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def test_demo_adapter_beats_base_model(demo_run):
    tiny_cfg, scores, logs = demo_run
    assert scores["fine-tuned"] > scores["base model"] + 0.1, scores
    assert logs[-1].startswith("fine-tuned score:")
    assert any(line.startswith("base model score:") for line in logs)
    assert any(line.startswith("validation score by step") for line in logs)

    run = tiny_cfg.run
    root = Path(run.root) / run.name
    data = pd.read_csv(root / "data" / "rewrites.csv")
    assert list(data.columns) == ["id", "original_text", "rewrite_prompt", "rewritten_text"]
    adapter = root / "finetune" / "adapter.lora.h5"
    assert 0 < adapter.stat().st_size < 2_000_000  # an adapter, not a model
    history = json.loads((root / "finetune" / "history.json").read_text())
    assert history["step_loss"][-1] < history["step_loss"][0] and "val_loss" in history["epochs"]
    assert len(history["validation_score"]) >= tiny_cfg.train.epochs and history["best"]
    assert (root / "finetune" / "loss_curve.png").exists()
    assert any((root / "finetune" / "tensorboard").rglob("*tfevents*"))
    sub = pd.read_csv(root / "predict" / "submission.csv", dtype=str, keep_default_na=False)
    assert sub["id"].is_unique and (sub["rewrite_prompt"].str.strip() != "").all()
    search = json.loads((root / "mean_prompt" / "search.json").read_text())
    # The mean prompt beats the best single target prompt as a constant.
    assert search["steps"][-1]["holdout"] > search["best_single_target_prompt"]["holdout"]
    assert (root / "mean_prompt" / "mean_prompt.txt").read_text().strip() == search["mean_prompt"]
    compare = json.loads((root / "compare" / "compare.json").read_text())["scores"]
    best_adapter = [label for label in scores if label.startswith("best adapter")]
    best_variants = {"predict_best", "predict_best + mean prompt"} if best_adapter else set()
    assert set(compare) - best_variants == {
        "constant: Improve the text to this.",
        "mean prompt",
        "model",
        "model + mean prompt",
        "mean prompt + model",
        "clustered mean prompt",
        "model + clustered mean prompt",
    }
    assert compare["model"] == pytest.approx(scores["fine-tuned"])
    if best_adapter:  # the best adapter's outputs, compared beside the last one's
        assert compare["predict_best"] == pytest.approx(scores[best_adapter[0]])
    assert (root / "compare" / "compare.png").exists()
    for stage in (
        "data",
        "finetune",
        "mean_prompt",
        "predict",
        "score",
        "predict_base",
        "score_base",
        "compare",
    ):
        assert (root / stage / "config.yaml").exists(), stage


def test_stage_script_reports_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 1\n")
    result = subprocess.run(
        [sys.executable, "scripts/score.py", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        f"config error: {bad}: unknown key 'train.epochz'; known keys here: "
    )
    assert "epochs" in last_line and "Traceback" not in result.stderr
