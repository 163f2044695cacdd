import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from processes import ROOT

from pipeline.stages.score import run_score_stage
from pipeline.text.encoder import embed, load_sentence_encoder, sharpened_cosine
from pipeline.text.tables import TableError


def test_sharpened_cosine_on_known_vectors():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = np.array([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    np.testing.assert_allclose(sharpened_cosine(a, b), [1.0, 0.0, -1.0, 0.125], atol=1e-12)


def test_stand_in_encoder_loads_through_tensorflow_hub(tiny):
    import tensorflow as tf

    encoder = load_sentence_encoder(str(tiny.encoder))
    raw = encoder(tf.constant(["Improve the text to this.", "Make it rhyme."]))
    assert isinstance(raw, (list, tuple)) and raw[0].shape == (2, 128)  # the st5 call signature
    np.testing.assert_allclose(np.linalg.norm(raw[0].numpy(), axis=1), 1.0, rtol=1e-5)
    vectors = embed(
        encoder,
        ["Add a title to this text."] * 3 + ["Convert this text into all capital letters."],
        batch_size=2,
    )
    assert vectors.shape == (4, 128)
    assert sharpened_cosine(vectors[:1], vectors[1:2])[0] == pytest.approx(1.0)
    assert sharpened_cosine(vectors[:1], vectors[3:])[0] < 0.5


def test_encoder_handle_must_be_url_dir_or_kaggle():
    with pytest.raises(
        ValueError, match="not a URL, an existing folder, or a Kaggle Models handle"
    ):
        load_sentence_encoder("no-such-encoder")


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_config_finds_its_encoders_piece_model(tiny, config, monkeypatch):
    """Kaggle handles and TF Hub URLs resolve to a folder (mocked here to the
    stand-in encoder's); the piece model is found in its assets."""
    import kagglehub
    import tensorflow_hub as hub

    from pipeline.run.config import load_config
    from pipeline.text.encoder import find_piece_model

    monkeypatch.chdir(ROOT)  # config paths are relative to the repository
    asked = []
    monkeypatch.setattr(
        kagglehub, "model_download", lambda handle: asked.append(handle) or str(tiny.encoder)
    )

    def resolve(handle):  # TF Hub resolves URLs; anything else must be a folder
        if not handle.startswith("https://"):
            raise OSError(f"{handle} is not a TF Hub URL")
        return asked.append(handle) or str(tiny.encoder)

    monkeypatch.setattr(hub, "resolve", resolve)
    cfg = load_config(ROOT / "configs" / config)
    found = find_piece_model(cfg.score.encoder, cfg.mean_prompt.piece_model)
    assert found.exists() and found.suffix == ".model"
    if not Path(cfg.score.encoder).is_dir():
        assert asked == [cfg.score.encoder.removeprefix("kaggle://")]


def _write(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_score_stage_writes_score_rows_and_histogram(tiny_cfg, tmp_path):
    truth = _write(
        tmp_path / "truth.csv",
        {
            "id": ["a", "b"],
            "rewrite_prompt": ["Add a title to this text.", "Make this text sound very excited."],
        },
    )
    preds = _write(
        tmp_path / "sub.csv",
        {
            "id": ["b", "a"],
            "rewrite_prompt": ["Make this text sound very excited.", "Add a title to this text."],
        },
    )
    tiny_cfg.score.truth, tiny_cfg.score.predictions = truth, preds
    assert run_score_stage(tiny_cfg, log=lambda *_: None) == pytest.approx(1.0)
    out = tmp_path / "cpu_tiny" / "score"
    assert json.loads((out / "score.json").read_text())["rows"] == 2
    assert list(pd.read_csv(out / "per_row.csv")["id"]) == ["b", "a"]
    assert (out / "histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "config.yaml").exists()


def test_score_stage_rejects_unknown_ids_and_blank_predictions(tiny_cfg, tmp_path):
    tiny_cfg.score.truth = _write(tmp_path / "truth.csv", {"id": ["a"], "rewrite_prompt": ["x"]})
    tiny_cfg.score.predictions = _write(
        tmp_path / "sub.csv", {"id": ["a", "z"], "rewrite_prompt": ["x", "y"]}
    )
    with pytest.raises(TableError, match=r"row 2, column 'id': id 'z' is not in"):
        run_score_stage(tiny_cfg, log=lambda *_: None)
    tiny_cfg.score.predictions = _write(tmp_path / "sub.csv", {"id": ["a"], "rewrite_prompt": [""]})
    with pytest.raises(TableError, match=r"row 1, column 'rewrite_prompt': empty text"):
        run_score_stage(tiny_cfg, log=lambda *_: None)


def test_score_stage_refuses_a_submission_that_lost_rows(tiny_cfg, tmp_path):
    tiny_cfg.score.truth = _write(
        tmp_path / "truth.csv", {"id": ["a", "b", "c"], "rewrite_prompt": ["x", "y", "z"]}
    )
    tiny_cfg.score.predictions = _write(
        tmp_path / "sub.csv", {"id": ["a"], "rewrite_prompt": ["x"]}
    )
    with pytest.raises(
        TableError, match=r"sub.csv: no prediction for 2 id\(s\) of .*truth.csv \(first: 'b'\)"
    ):
        run_score_stage(tiny_cfg, log=lambda *_: None)
