"""A /kaggle/input path is found in Kaggle's new layout and in the old
one, and one found in neither says what is mounted."""

import pytest

from pipeline.text.kaggle_paths import KaggleInputError, found_on_kaggle

NEW_TEST_CSV = "/kaggle/input/competitions/llm-prompt-recovery/test.csv"
OLD_TEST_CSV = "/kaggle/input/llm-prompt-recovery/test.csv"


@pytest.fixture
def mounted(tmp_path, monkeypatch):
    """Makes the given files under a stand-in /kaggle/input; returns its root."""
    root = tmp_path / "input"
    monkeypatch.setenv("KAGGLE_INPUT_ROOT", str(root))

    def mount(*paths):
        for path in paths:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text("x")
        return root

    return mount


@pytest.mark.parametrize(
    "configured, mounted_at",
    [
        (NEW_TEST_CSV, "competitions/llm-prompt-recovery/test.csv"),  # as configured
        (NEW_TEST_CSV, "llm-prompt-recovery/test.csv"),  # the old layout
        (OLD_TEST_CSV, "competitions/llm-prompt-recovery/test.csv"),  # an old config
        ("/kaggle/input/source-texts/texts.csv", "datasets/someone/source-texts/texts.csv"),
        (
            "/kaggle/input/gemma/transformers/7b-it/3/config.json",
            "models/google/gemma/transformers/7b-it/3/config.json",
        ),
    ],
)
def test_a_kaggle_input_is_found_in_either_layout(mounted, configured, mounted_at):
    root = mounted(mounted_at)
    said = []
    assert found_on_kaggle(configured, said.append) == str(root / mounted_at)
    assert said == (
        []
        if configured == f"/kaggle/input/{mounted_at}"
        else [f"{configured}: not mounted there; found at {root / mounted_at}"]
    )


def test_what_is_not_under_kaggle_input_is_left_alone(mounted):
    mounted()
    assert found_on_kaggle("data/test.csv") == "data/test.csv"
    assert found_on_kaggle("gs://bucket/test.csv") == "gs://bucket/test.csv"


def test_an_input_found_nowhere_lists_what_is_mounted(mounted):
    mounted("competitions/other-competition/test.csv", "datasets/me/texts/texts.csv")
    with pytest.raises(
        KaggleInputError, match=r"test\.csv: not mounted, and nothing matching"
    ) as e:
        found_on_kaggle(NEW_TEST_CSV)
    assert "holds competitions/other-competition, datasets/me/texts" in str(e.value)


def test_two_matches_are_named_not_chosen(mounted):
    root = mounted("datasets/a/texts/t.csv", "datasets/b/texts/t.csv")
    with pytest.raises(KaggleInputError, match="2 matches") as e:
        found_on_kaggle("/kaggle/input/texts/t.csv")
    assert f"{root}/datasets/a/texts/t.csv, {root}/datasets/b/texts/t.csv" in str(e.value)


def test_a_stage_goes_on_without_an_input_it_does_not_read(mounted, tmp_path):
    """predict on Kaggle with the test file attached and the source texts not:
    the sources stay as configured, with a note of what is mounted."""
    from pipeline.errors import InputError
    from pipeline.run.config import load_config
    from pipeline.run.storage import localized
    from pipeline.text.sources import read_sources

    root = mounted("llm-prompt-recovery/test.csv")
    notes = []
    cfg = localized(load_config("configs/kaggle_tpu_v5e_8.yaml"), notes.append)
    assert cfg.predict.input == str(root / "llm-prompt-recovery" / "test.csv")
    assert cfg.data.sources[0].path == "/kaggle/input/source-texts/texts.csv"
    assert notes[-1].startswith("note: /kaggle/input/source-texts/texts.csv: not mounted")
    assert "holds llm-prompt-recovery" in notes[-1]
    with pytest.raises(InputError, match="source-texts/texts.csv"):
        read_sources(cfg.data.sources)
