import numpy as np
import pytest

from pipeline.stages.mean_prompt import (
    EmbeddingCache,
    MeanScore,
    beam_search,
    best_constant,
    candidate_moves,
)
from pipeline.text.combine import combine_parts
from pipeline.text.token_limit import TokenLimit


class _AxisEncoder:
    """Each known word is one axis; a string embeds as the sum of its words'
    axes (unit-normalised by `embed`). Records what it was asked to embed."""

    WORDS = ["alpha", "beta", "gamma", "delta"]

    def __init__(self):
        self.calls = []

    def __call__(self, sentences):
        texts = [s.decode() for s in sentences.numpy()]
        self.calls.append(texts)
        out = np.zeros((len(texts), len(self.WORDS)), dtype="float32")
        for i, text in enumerate(texts):
            for w in text.split():
                out[i, self.WORDS.index(w)] += 1.0
        return [out]


def test_beam_search_finds_the_known_best_string():
    # Targets "alpha" and "beta": one word scores mean(1, 0) = 0.5, while
    # "alpha beta" scores 0.707**3 = 0.354, so the best string is one word
    # and the search stops when step 2 gains nothing.
    cache = EmbeddingCache(_AxisEncoder())
    objective = MeanScore(cache, ["alpha", "beta"])
    best, history = beam_search(
        objective,
        ["alpha", "beta", "gamma"],
        beam_width=3,
        steps=5,
        fits=lambda s: True,
        log=lambda *_: None,
    )
    assert best in ("alpha", "beta") and history[0]["train"] == pytest.approx(0.5)
    assert len(history) == 1  # step 2 gains nothing: stop

    # Three "alpha" targets for one "beta": whatever the search returns
    # scores at least as well as "alpha" alone (0.75) and holds no "gamma".
    objective = MeanScore(cache, ["alpha"] * 3 + ["beta"])
    best, _ = beam_search(
        objective,
        ["alpha", "beta", "gamma"],
        beam_width=3,
        steps=6,
        fits=lambda s: True,
        log=lambda *_: None,
    )
    vector = np.array([best.split().count("alpha"), best.split().count("beta")], dtype=float)
    cos = vector / np.linalg.norm(vector)
    score = (3 * cos[0] ** 3 + cos[1] ** 3) / 4
    assert score >= 0.75 - 1e-9  # never worse than "alpha" alone
    assert "gamma" not in best


def test_cache_embeds_each_string_once():
    encoder = _AxisEncoder()
    cache = EmbeddingCache(encoder, batch_size=2)
    cache(["alpha", "beta", "alpha"])
    cache(["beta", "gamma"])
    embedded = [t for call in encoder.calls for t in call]
    assert sorted(embedded) == ["alpha", "beta", "gamma"]
    assert (cache.hits, cache.misses) == (2, 3)
    assert max(len(c) for c in encoder.calls) <= 2  # batches of batch_size


def test_search_never_scores_past_the_token_limit():
    cache = EmbeddingCache(_AxisEncoder())
    objective = MeanScore(cache, ["alpha"])
    fits = lambda s: len(s.split()) <= 2  # noqa: E731
    beam_search(objective, ["alpha", "beta"], beam_width=4, steps=6, fits=fits, log=lambda *_: None)
    assert all(len(t.split()) <= 2 for t in cache.vectors)


def test_edit_moves_insert_and_replace():
    moves = set(candidate_moves("a b", ["x"], "edit"))
    assert moves == {"a b x", "x a b", "x b", "a x b", "a x"}
    assert set(candidate_moves("a b", ["x"], "append")) == {"a b x"}


def test_token_limit_on_the_encoder_pieces(tiny):
    limit = TokenLimit(tiny.encoder / "assets" / "spiece.model", 10)
    long = "Rewrite this text as a pirate would say it. " * 5
    assert not limit(long)
    cut = limit.cut(long)
    assert cut and limit(cut) and long.startswith(cut)


def test_best_constant_is_picked_on_the_training_targets():
    cache = EmbeddingCache(_AxisEncoder())
    train, holdout = ["alpha", "alpha beta", "alpha"], ["gamma", "gamma"]
    prompt, holdout_score = best_constant(cache, ["alpha", "gamma"], train, holdout)
    assert prompt == "alpha" and holdout_score == pytest.approx(
        0.0
    )  # not the holdout's own best, "gamma"


def test_predictions_pandas_reads_as_missing_get_the_fallback():
    combined, fallbacks = combine_parts([["NA", "None", "null", "nan", "N/A", "Nancy"]], " ", "F")
    assert combined == ["F", "F", "F", "F", "F", "Nancy"] and fallbacks == 5


def test_combination_skips_empty_parts_and_is_never_empty():
    model = ["Make it rhyme.", "", "  "]
    mean = ["Improve this text.", "Improve this text.", ""]
    combined, fallbacks = combine_parts([model, mean], " | ", "FALLBACK")
    assert combined == ["Make it rhyme. | Improve this text.", "Improve this text.", "FALLBACK"]
    assert fallbacks == 1
    cut, _ = combine_parts([model, mean], " ", "F", cut=lambda t: " ".join(t.split()[:2]))
    assert cut == ["Make it", "Improve this", "F"]


def test_stage_refuses_to_write_an_empty_mean_prompt(tiny_cfg, tmp_path):
    import pandas as pd

    from pipeline.stages.mean_prompt import run_mean_prompt_stage

    pd.DataFrame({"rewrite_prompt": ["1 2 3."] * 20}).to_csv(tmp_path / "t.csv", index=False)
    tiny_cfg.mean_prompt.targets = str(tmp_path / "t.csv")  # no word is letters only
    with pytest.raises(ValueError, match="no candidate could be scored"):
        run_mean_prompt_stage(tiny_cfg, log=lambda *_: None)
    assert not (tmp_path / "cpu_tiny" / "mean_prompt" / "mean_prompt.txt").exists()


@pytest.mark.slow
def test_the_combined_objective_scores_what_predict_writes(tiny_cfg):
    import json

    import pandas as pd

    from pipeline.run.run_dir import RunDir
    from pipeline.stages.data import run_data_stage
    from pipeline.stages.mean_prompt import run_mean_prompt_stage
    from pipeline.stages.predict import run_predict_stage
    from pipeline.stages.score import run_score_stage

    cfg = tiny_cfg
    cfg.data.max_rows, cfg.predict.adapter, cfg.predict.max_new_tokens = 64, "none", 4
    quiet = dict(log=lambda *_: None)
    run_data_stage(cfg, **quiet)
    with pytest.raises(ValueError, match="objective=combined needs mean_prompt.outputs"):
        cfg.mean_prompt.objective = "combined"
        run_mean_prompt_stage(cfg, **quiet)
    cfg.predict.rows, cfg.predict.out = "all", "predict_all"
    outputs = RunDir(cfg).raw_outputs
    run_predict_stage(cfg, **quiet)  # the model's outputs for every row, training rows too
    cfg.mean_prompt.outputs, cfg.mean_prompt.combined_rows = str(outputs), 16
    cfg.mean_prompt.steps, cfg.mean_prompt.beam_width, cfg.mean_prompt.clusters = 3, 4, 0
    run_mean_prompt_stage(cfg, **quiet)
    search = json.loads((RunDir(cfg).mean_prompt.parent / "search.json").read_text())
    assert search["objective"] == "combined"
    # predict on the holdout rows, its outputs those the search saw, joined with the mean prompt.
    cfg.predict.rows, cfg.predict.out = "holdout", "predict_check"
    cfg.predict.combine = [str(outputs), "mean_prompt"]
    submission = run_predict_stage(cfg, **quiet)
    written = pd.read_csv(submission, keep_default_na=False)["rewrite_prompt"]
    assert all(text.endswith(search["mean_prompt"]) for text in written)
    cfg.score.out = "score_check"
    assert run_score_stage(cfg, **quiet) == pytest.approx(search["steps"][-1]["holdout"], abs=1e-6)
    assert search["steps"][-1]["holdout"] > search["model_outputs_alone"]["holdout"]
