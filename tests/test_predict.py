import json

import pandas as pd
import pytest

from pipeline.errors import InputError
from pipeline.models import generation
from pipeline.stages.predict import run_predict_stage
from pipeline.text.tables import TableError


def _test_csv(tmp_path, n=5):
    df = pd.DataFrame(
        {
            "id": [f"q{i}" for i in range(n)],
            "original_text": ["The cat sat. " * (i + 1) for i in range(n)],
            "rewritten_text": ["THE CAT SAT. " * (i + 1) for i in range(n)],
        }
    )
    df.to_csv(tmp_path / "test.csv", index=False)
    return df


def test_submission_in_input_order_one_row_per_id(tiny_cfg, tmp_path):
    df = _test_csv(tmp_path)
    tiny_cfg.predict.input, tiny_cfg.predict.rows, tiny_cfg.predict.adapter = (
        str(tmp_path / "test.csv"),
        "all",
        "none",
    )
    tiny_cfg.predict.max_new_tokens = 4
    path = run_predict_stage(tiny_cfg, log=lambda *_: None)
    sub = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(sub.columns) == ["id", "rewrite_prompt"]
    assert list(sub["id"]) == list(df["id"])
    assert (sub["rewrite_prompt"].str.strip() != "").all()
    summary = json.loads((path.parent / "predict_log.json").read_text())
    assert summary["rows"] == 5 and summary["adapter"] is None


def test_empty_outputs_replaced_by_fallback_and_counted(tiny_cfg, tmp_path, monkeypatch):
    _test_csv(tmp_path, n=3)

    def empty_outputs(self, prompts, **_):
        yield list(range(len(prompts))), ["", "  Add a title.", "\n"]

    monkeypatch.setattr(generation.BatchedGenerator, "generate", empty_outputs)
    tiny_cfg.predict.input, tiny_cfg.predict.rows, tiny_cfg.predict.adapter = (
        str(tmp_path / "test.csv"),
        "all",
        "none",
    )
    logs = []
    path = run_predict_stage(tiny_cfg, log=logs.append)
    sub = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(sub["rewrite_prompt"]) == [
        tiny_cfg.predict.fallback,
        "Add a title.",
        tiny_cfg.predict.fallback,
    ]
    assert "2 empty prediction(s) replaced by the fallback" in logs[-1]
    raw = pd.read_csv(path.parent / "model_outputs.csv", dtype=str, keep_default_na=False)
    assert list(raw["rewrite_prompt"]) == ["", "Add a title.", ""]  # before combination


def test_combine_with_mean_prompt_and_another_submission(tiny_cfg, tmp_path, monkeypatch):
    df = _test_csv(tmp_path, n=2)

    def outputs(self, prompts, **_):
        yield [1, 0], ["second", ""]

    monkeypatch.setattr(generation.BatchedGenerator, "generate", outputs)
    mean = tmp_path / "cpu_tiny" / "mean_prompt" / "mean_prompt.txt"
    mean.parent.mkdir(parents=True)
    mean.write_text("Improve this text.\n")
    pd.DataFrame({"id": df["id"][::-1], "rewrite_prompt": ["B", "A"]}).to_csv(
        tmp_path / "other.csv", index=False
    )
    tiny_cfg.predict.input, tiny_cfg.predict.rows, tiny_cfg.predict.adapter = (
        str(tmp_path / "test.csv"),
        "all",
        "none",
    )
    tiny_cfg.predict.combine = ["model", str(tmp_path / "other.csv"), "mean_prompt"]
    path = run_predict_stage(tiny_cfg, log=lambda *_: None)
    sub = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(sub["rewrite_prompt"]) == ["A Improve this text.", "second B Improve this text."]


def test_missing_adapter_is_a_clear_error(tiny_cfg, tmp_path):
    _test_csv(tmp_path, n=1)
    tiny_cfg.predict.input, tiny_cfg.predict.rows = str(tmp_path / "test.csv"), "all"
    tiny_cfg.predict.adapter = str(tmp_path / "none.lora.h5")
    with pytest.raises(FileNotFoundError, match="run the finetune stage first"):
        run_predict_stage(tiny_cfg, log=lambda *_: None)


def test_bad_input_csv_stops_before_loading_the_model(tiny_cfg, tmp_path):
    (tmp_path / "test.csv").write_text("id,original_text\n1,a\n")
    tiny_cfg.predict.input = str(tmp_path / "test.csv")
    with pytest.raises(TableError, match="missing column 'rewritten_text'"):
        run_predict_stage(tiny_cfg, log=lambda *_: None)


def test_holdout_rows_of_a_file_that_is_not_a_training_csv_are_refused(tiny_cfg, tmp_path):
    _test_csv(tmp_path)  # a test file: no rewrite_prompt, so no split to take the holdout of
    tiny_cfg.predict.input, tiny_cfg.predict.rows = str(tmp_path / "test.csv"), "holdout"
    with pytest.raises(InputError, match=r"test\.csv: predict\.rows=holdout .* predict\.rows=all"):
        run_predict_stage(tiny_cfg, log=lambda *_: None)


def test_missing_combine_part_stops_before_any_generation(tiny_cfg, tmp_path, monkeypatch):
    _test_csv(tmp_path, n=2)
    import pipeline.stages.predict as predict

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load when a combine part is missing")

    monkeypatch.setattr(predict, "load_model", no_model)
    tiny_cfg.predict.input, tiny_cfg.predict.rows = str(tmp_path / "test.csv"), "all"
    tiny_cfg.predict.combine = ["model", "mean_prompt"]
    with pytest.raises(FileNotFoundError, match="run the mean-prompt stage first"):
        run_predict_stage(tiny_cfg, log=lambda *_: None)


def test_combined_prompts_are_cut_to_what_the_encoder_sees(tiny_cfg, tmp_path, monkeypatch):
    from pipeline.text.encoder import find_piece_model
    from pipeline.text.token_limit import TokenLimit

    _test_csv(tmp_path, n=2)

    def outputs(self, prompts, **_):
        yield [0, 1], ["Make it rhyme.", "Shorter."]

    monkeypatch.setattr(generation.BatchedGenerator, "generate", outputs)
    mean = tmp_path / "cpu_tiny" / "mean_prompt" / "mean_prompt.txt"
    mean.parent.mkdir(parents=True)
    long_mean_prompt = "Rewrite this text as a pirate would say it, please. " * 30
    mean.write_text(long_mean_prompt + "\n")
    tiny_cfg.predict.input, tiny_cfg.predict.rows, tiny_cfg.predict.adapter = (
        str(tmp_path / "test.csv"),
        "all",
        "none",
    )
    tiny_cfg.predict.combine = ["model", "mean_prompt"]
    path = run_predict_stage(tiny_cfg, log=lambda *_: None)
    sub = pd.read_csv(path, dtype=str, keep_default_na=False)
    limit = TokenLimit(find_piece_model(tiny_cfg.score.encoder), tiny_cfg.mean_prompt.max_tokens)
    assert not limit("Make it rhyme. " + long_mean_prompt.strip())
    for model_output, prompt in zip(
        ["Make it rhyme.", "Shorter."], sub["rewrite_prompt"], strict=True
    ):
        assert limit(prompt) and prompt.startswith(model_output + " Rewrite this text")
        assert not limit(prompt + " pirate")  # cut at the limit, not before


def test_each_opening_prefills_its_generation_and_the_answers_join_in_order(tiny_cfg, tmp_path):
    from pipeline.text.openings import model_outputs

    _test_csv(tmp_path, n=3)
    tiny_cfg.predict.input, tiny_cfg.predict.rows, tiny_cfg.predict.adapter = (
        str(tmp_path / "test.csv"),
        "all",
        "none",
    )
    tiny_cfg.predict.max_new_tokens = 3
    tiny_cfg.predict.openings = ["Rewrite this", "Make the text"]
    logs = []
    path = run_predict_stage(tiny_cfg, log=logs.append)
    raw = pd.read_csv(path.parent / "model_outputs.csv", dtype=str, keep_default_na=False)
    for text in raw["rewrite_prompt"]:
        # Each answer begins with its opening; the second follows the first.
        assert text.startswith("Rewrite this") and " Make the text" in text, text
    summary = json.loads((path.parent / "predict_log.json").read_text())
    assert summary["openings"] == tiny_cfg.predict.openings
    assert summary["outputs_cut_at_max_new_tokens"] <= 2 * 3

    class Tokenizer:  # words as ids, enough for the prefill
        def __call__(self, texts):
            return [[len(word) for word in text.split()] for text in texts]

    calls = []

    def generate(prompts, kept):
        calls.append((prompts, kept))
        return [f" {kept} tokens kept " if row[0] else "" for row in prompts]

    joined = model_outputs([[1, 2], [0]], ["ab c", "d"], Tokenizer(), generate, " | ")
    assert calls == [([[1, 2, 2, 1], [0, 2, 1]], 2), ([[1, 2, 1], [0, 1]], 1)]
    assert joined == ["2 tokens kept | 1 tokens kept", ""]  # an empty answer is skipped
