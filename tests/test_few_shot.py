"""Few-shot recovery prompts: worked examples drawn from the training rows
by seed, left out of training, kept in the adapter's template so predict
shows the model the same."""

import json
import os

import pandas as pd
import pytest
from processes import ROOT

from pipeline.errors import InputError
from pipeline.run.config import load_config
from pipeline.stages.data import run_data_stage
from pipeline.stages.finetune import run_finetune_stage
from pipeline.stages.predict import run_predict_stage
from pipeline.text.recovery import draw_shots
from pipeline.text.templates import few_shot_template, format_recovery, worked_example

COMPACT = "Original: {original_text}\nRewritten: {rewritten_text}\nPrompt: "


def test_the_few_shot_template_is_the_examples_then_the_template():
    template = few_shot_template(COMPACT, [("a {x}", "b", "Say {it}."), ("c", "d", "e")])
    assert format_recovery(template, "o", "r") == (
        worked_example(COMPACT, "a {x}", "b", "Say {it}.")
        + worked_example(COMPACT, "c", "d", "e")
        + format_recovery(COMPACT, "o", "r")
    )
    assert worked_example(COMPACT, "c", "d", "e") == "Original: c\nRewritten: d\nPrompt: e\n\n"


class WordTokenizer:
    start_token_id = 1

    def __call__(self, texts):
        return [[2] * len(text.split()) for text in texts]


def test_shots_are_drawn_by_seed_among_rows_that_fit_half_the_prompt():
    df = pd.DataFrame(
        {
            "original_text": ["short"] * 6 + ["long " * 60] * 6,
            "rewritten_text": ["x"] * 12,
            "rewrite_prompt": ["p"] * 12,
        }
    )
    # Each short example is 7 words; half of 40 tokens shared by 2 is 10.
    drawn = draw_shots(WordTokenizer(), df, COMPACT, 2, seed=0, prompt_budget=40)
    assert drawn == draw_shots(WordTokenizer(), df, COMPACT, 2, seed=0, prompt_budget=40)
    assert len(set(drawn)) == 2 and all(i < 6 for i in drawn)
    seeds = {tuple(draw_shots(WordTokenizer(), df, COMPACT, 2, s, 40)) for s in range(5)}
    assert len(seeds) > 1  # the seed decides
    with pytest.raises(InputError, match="train.shots=2: 0 training row"):
        draw_shots(WordTokenizer(), df, COMPACT, 2, seed=0, prompt_budget=20)


@pytest.mark.slow
def test_the_adapter_keeps_the_shots_and_predict_uses_them(tiny, tmp_path):
    os.chdir(ROOT)
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            f"model.preset={tiny.preset}",
            f"score.encoder={tiny.encoder}",
            "data.max_rows=48",
            "train.epochs=1",
            "train.shots=2",
            "train.sequence_length=1024",
            "predict.max_new_tokens=4",
        ],
    )
    cfg.train.template = COMPACT
    quiet = dict(log=lambda *_: None)
    run_data_stage(cfg, **quiet)
    logs = []
    run_finetune_stage(cfg, log=logs.append)
    line = next(line for line in logs if "worked example(s) before every prompt" in line)
    drawn = [int(i) for i in line.split("training rows ")[1].split(" (")[0].split(", ")]
    data = pd.read_csv(tmp_path / "cpu_tiny" / "data" / "rewrites.csv")  # train rows come first
    shots = data.iloc[drawn][["original_text", "rewritten_text", "rewrite_prompt"]]
    adapter = json.loads((tmp_path / "cpu_tiny" / "finetune" / "adapter.json").read_text())
    assert adapter["template"] == few_shot_template(COMPACT, shots.itertuples(index=False))
    trained = next(line for line in logs if " train / " in line)
    total_train = (
        len(data) - int(len(data) * cfg.split.validation) - int(len(data) * cfg.split.holdout)
    )
    assert f"{total_train - 2} train / " in trained  # the shots are left out of training
    predicted = []
    run_predict_stage(cfg, log=predicted.append)
    assert any("trained with train.template its own" in line for line in predicted)
