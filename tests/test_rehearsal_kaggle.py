"""Rehearsal of the Kaggle TPU VM run: the README's own command,
`make all CONFIG=configs/kaggle_tpu_v5e_8.yaml`, on the tiny stand-ins.

Only the model, the encoder and the device count are overridden (the base
config's sizes, dtype, search settings and input paths stay); the inputs
are mounted in Kaggle's current layout (`competitions/<slug>/`,
`datasets/<owner>/<slug>/`) in a folder the run must not change, which
`KAGGLE_INPUT_ROOT` puts where `/kaggle/input` would be; the test file has
no true prompts, like the competition's. Then predict runs again with the
test file in the old layout (`/kaggle/input/<slug>/`).
"""

import hashlib
import os
import stat
import subprocess

import pandas as pd
import pytest
from processes import ROOT

from pipeline.text import rules

pytestmark = pytest.mark.slow

# What a newcomer must not read between the pipeline's lines.
NOISE = ("absl::InitializeLog", "cuInit", "cudart_stub", "oneDNN", "pkg_resources", "normalizer.cc")


def snapshot(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def kaggle_input(tmp_path_factory):
    """/kaggle/input as a notebook sees it today: the user's source texts (a
    dataset) and the competition's test.csv (no rewrite_prompt), read-only."""
    folder = tmp_path_factory.mktemp("kaggle") / "input"
    paragraphs = [
        p.strip() for p in (ROOT / "demo" / "texts.txt").read_text().split("\n\n") if p.strip()
    ]
    sources = folder / "datasets" / "someone" / "source-texts"
    sources.mkdir(parents=True)
    pd.DataFrame({"text": paragraphs}).to_csv(sources / "texts.csv", index=False)
    competition = folder / "competitions" / "llm-prompt-recovery"
    competition.mkdir(parents=True)
    test = pd.DataFrame(
        {
            "id": [f"t{i}" for i in range(5)],
            "original_text": paragraphs[:5],
            "rewritten_text": [
                rules.rewrite(prompt, text)
                for prompt, text in zip(rules.RULES, paragraphs[:5], strict=False)
            ],
        }
    )
    test.to_csv(competition / "test.csv", index=False)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return folder


def make_on_kaggle(target, input_root, args):
    """`make TARGET CONFIG=configs/kaggle_tpu_v5e_8.yaml ARGS=...` with
    `input_root` as /kaggle/input; returns stdout and stderr."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "VERBOSE", "MAKEFLAGS", "MAKELEVEL")
    }
    result = subprocess.run(
        ["make", target, "CONFIG=configs/kaggle_tpu_v5e_8.yaml", "ARGS=" + " ".join(args)],
        cwd=ROOT,
        env=dict(env, KAGGLE_INPUT_ROOT=str(input_root)),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result.stdout + result.stderr


def test_kaggle_tpu_command_ends_in_a_submission_and_an_evaluation(tiny, kaggle_input, tmp_path):
    before = snapshot(kaggle_input)
    args = [
        f"run.root={tmp_path}",
        f"model.preset={tiny.preset}",
        f"score.encoder={tiny.encoder}",
        "distribution.host_device_count=8",
    ]
    output = make_on_kaggle("all", kaggle_input, args)
    run = tmp_path / "kaggle_tpu_v5e_8"
    submission = pd.read_csv(run / "predict" / "submission.csv", dtype=str, keep_default_na=False)
    assert list(submission["id"]) == [f"t{i}" for i in range(5)]
    assert (submission["rewrite_prompt"].str.strip() != "").all()
    # The adapter is evaluated on the holdout rows of the training data, in folders that say so.
    assert "evaluate: " in output and "has no rewrite_prompt column" in output
    holdout = pd.read_csv(
        run / "predict_holdout" / "submission.csv", dtype=str, keep_default_na=False
    )
    data = pd.read_csv(run / "data" / "rewrites.csv", dtype=str, keep_default_na=False)
    assert set(holdout["id"]) <= set(data["id"]) and len(holdout) >= 1
    assert (run / "score_holdout" / "score.json").exists() and (
        run / "compare_holdout" / "compare.json"
    ).exists()
    assert snapshot(kaggle_input) == before  # the input folder is read-only
    noisy = [line for line in output.splitlines() if any(word in line for word in NOISE)]
    assert not noisy, noisy
    # Some notebooks still see the old layout (/kaggle/input/<slug>/): the same
    # config's predict finds test.csv there and writes the same submission.
    old_layout = tmp_path / "old-input"
    (old_layout / "llm-prompt-recovery").mkdir(parents=True)
    (old_layout / "llm-prompt-recovery" / "test.csv").write_bytes(
        (kaggle_input / "competitions" / "llm-prompt-recovery" / "test.csv").read_bytes()
    )
    output = make_on_kaggle("predict", old_layout, args)
    assert f"found at {old_layout / 'llm-prompt-recovery' / 'test.csv'}" in output
    again = pd.read_csv(run / "predict" / "submission.csv", dtype=str, keep_default_na=False)
    assert again.equals(submission)
