"""The offline Kaggle bundle: built from the demo run, installed into a fresh
virtual environment that has only torch (as Kaggle's image has), with no
package index, and run: the submission is the predict stage's."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from processes import ROOT, bare_python

from pipeline.run.config import KaggleConfig
from pipeline.run.run_dir import RunDir
from pipeline.stages.bundle import fetch_wheels, run_kaggle_bundle_stage
from pipeline.stages.export import run_export_stage
from pipeline.text.combine import combine_parts
from pipeline.text.encoder import find_piece_model
from pipeline.text.tables import write_table
from pipeline.text.token_limit import TokenLimit


def with_changes(cfg, **sections):
    return dataclasses.replace(
        cfg,
        **{
            name: dataclasses.replace(getattr(cfg, name), **changes)
            for name, changes in sections.items()
        },
    )


def test_bundle_refuses_parts_the_notebook_cannot_have(tiny_cfg):
    cfg = with_changes(tiny_cfg, predict={"combine": ["model", "other_submission.csv"]})
    with pytest.raises(
        ValueError, match="combines only model and mean_prompt; 'other_submission.csv'"
    ):
        run_kaggle_bundle_stage(cfg, log=lambda *_: None)
    # Each row's cluster is picked by the sentence encoder, which the notebook lacks.
    clustered = with_changes(tiny_cfg, predict={"combine": ["model", "clustered_mean_prompt"]})
    with pytest.raises(ValueError, match="combines only model and mean_prompt; 'clustered_mean"):
        run_kaggle_bundle_stage(clustered, log=lambda *_: None)


def test_bundle_asks_for_the_export_first(tiny_cfg):
    with pytest.raises(
        FileNotFoundError, match="peft_adapter not found; run the export stage first"
    ):
        run_kaggle_bundle_stage(tiny_cfg, log=lambda *_: None)


def test_the_bundle_ships_the_adapter_and_the_notebook_loads_it(tiny_cfg, monkeypatch, tmp_path):
    """The wheels' download aside (the slow test below installs them), the
    bundle holds the run's PEFT adapter, its settings name it, and the
    notebook's predict loads the base model (where Kaggle mounts it) with it."""
    kaggle_input = tmp_path / "kaggle-input"
    gemma = kaggle_input / "models" / "google" / "gemma" / "transformers" / "7b-it" / "3"
    gemma.mkdir(parents=True)
    monkeypatch.setenv("KAGGLE_INPUT_ROOT", str(kaggle_input))
    from pipeline.kaggle import transformers_predict
    from pipeline.stages import bundle as bundle_stage

    run = RunDir(tiny_cfg)
    (run.peft_adapter).mkdir(parents=True)
    (run.peft_adapter / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(bundle_stage, "fetch_wheels", lambda *args: None)
    bundle = run_kaggle_bundle_stage(tiny_cfg, log=lambda *_: None)
    settings = json.loads((bundle / "settings.json").read_text())
    assert (bundle / settings["adapter"] / "adapter_config.json").read_text() == "{}"

    class Loaded(Exception):
        """What comes after loading is the slow test's."""

    loaded = []

    def load_model(model_dir, adapter_dir, torch_dtype):
        loaded.append((model_dir, adapter_dir))
        raise Loaded

    monkeypatch.setattr(transformers_predict, "load_model", load_model)
    write_table(
        pd.DataFrame({"id": ["r1"], "original_text": ["a"], "rewritten_text": ["b"]}),
        bundle / "test.csv",
    )
    with pytest.raises(Loaded):
        transformers_predict.run_transformers_predict(
            settings, bundle, bundle / "test.csv", bundle / "out.csv", log=lambda *_: None
        )
    assert loaded == [(str(gemma), bundle / "peft_adapter")]


def test_the_notebook_refuses_a_bundle_for_another_python_before_installing(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copyfile(ROOT / "scripts" / "kaggle_predict.py", bundle / "kaggle_predict.py")
    settings = {"python_version": "3.9", "platforms": ["manylinux_2_28_x86_64"]}
    (bundle / "settings.json").write_text(json.dumps(settings))
    done = subprocess.run(
        [sys.executable, str(bundle / "kaggle_predict.py")], capture_output=True, text=True
    )
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert (
        f"wheels are for Python 3.9 on manylinux_2_28_x86_64; this notebook runs Python {running}"
        in done.stderr
    )
    assert f'make kaggle-bundle ARGS="kaggle.python_version={running}"' in done.stderr


@pytest.mark.slow
def test_the_default_bundles_wheels_install_offline_on_kaggles_python_3_12(tmp_path):
    """Kaggle's image runs Python 3.12: the wheels fetched for the default
    kaggle settings install there with no index, and the compiled ones load.
    (--no-deps: torch, which Kaggle's image has, is a 500 MB CUDA wheel here.)"""
    python = bare_python("3.12")
    fetch_wheels(KaggleConfig(), tmp_path / "wheels", log=lambda *_: None)
    venv = tmp_path / "kaggle-3.12"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    offline = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    offline["PIP_CONFIG_FILE"] = os.devnull
    wheels = tmp_path / "wheels"
    install = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index"]
    done = subprocess.run(
        [
            *install,
            "--no-deps",
            "--find-links",
            str(wheels),
            "-r",
            str(ROOT / "requirements-kaggle.txt"),
            *map(str, wheels.glob("prompt_recovery-*.whl")),
        ],
        env=offline,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = "numpy, pandas, regex, safetensors, sentencepiece, tokenizers, yaml"
    imports = f"import {compiled}; import pipeline.text.tables"
    subprocess.run([str(venv / "bin" / "python"), "-c", imports], env=offline, check=True)


@pytest.mark.slow
def test_bundle_installs_offline_and_writes_the_pipelines_submission(demo_run, tmp_path):
    cfg, _, _ = demo_run
    # This machine's CPU torch wheel is for the tests' Python, so the notebook runs on it here.
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    cfg = with_changes(
        cfg, predict={"combine": ["model", "mean_prompt"]}, kaggle={"python_version": running}
    )
    quiet = dict(log=lambda *_: None)
    run_export_stage(cfg, **quiet)
    # Kaggle's own Gemma (transformers format) stands for the base model.
    base_cfg = with_changes(cfg, export={"adapter": "none", "out": "export_base", "peft": False})
    base_model = Path(run_export_stage(base_cfg, **quiet)["transformers"])
    bundle = run_kaggle_bundle_stage(cfg, **quiet)
    assert {p.name for p in bundle.iterdir()} == {
        "config.yaml",
        "kaggle_predict.py",
        "requirements.txt",
        "settings.json",
        "wheels",
        "peft_adapter",
        "piece_model.model",
    }

    run = RunDir(cfg)
    test_csv = tmp_path / "test.csv"
    write_table(run.read_predict_rows(log=lambda *_: None), test_csv)
    venv = tmp_path / "kaggle-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # Kaggle's image has torch; this machine's package configuration finds the CPU build.
    subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    offline = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    offline["PIP_CONFIG_FILE"] = os.devnull  # no index, no find-links but the bundle's
    submission = tmp_path / "submission.csv"
    done = subprocess.run(
        [
            python,
            str(bundle / "kaggle_predict.py"),
            "--input",
            str(test_csv),
            "--output",
            str(submission),
            "--base-model",
            str(base_model),
        ],
        cwd=tmp_path,
        env=offline,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    outputs = pd.read_csv(run.raw_outputs, dtype=str, keep_default_na=False)
    limit = TokenLimit(find_piece_model(cfg.score.encoder), cfg.mean_prompt.max_tokens)
    expected, _ = combine_parts(
        [list(outputs["rewrite_prompt"]), [run.mean_prompt.read_text().strip()] * len(outputs)],
        cfg.predict.separator,
        cfg.predict.fallback,
        limit.cut,
    )
    written = pd.read_csv(submission, dtype=str, keep_default_na=False)
    assert list(written["id"]) == list(outputs["id"])
    # The notebook merges the adapter with PEFT, in torch; the predict stage
    # merges it in JAX. The merged kernels differ in their last bits, so
    # greedy decoding may split where two tokens all but tie: on the
    # 3-layer stand-in, a row of the ~145 holdout rows. A wrong template,
    # tokenizer or adapter changes most rows. (The export, merged as the
    # predict stage merges, gives its tokens exactly: tests/test_export.py.)
    same = sum(w == e for w, e in zip(written["rewrite_prompt"], expected, strict=True))
    assert same >= 0.98 * len(expected), (same, len(expected))
