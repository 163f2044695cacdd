"""The Kaggle bundle: one folder to upload as a Kaggle dataset, from which a
notebook with the internet off writes `submission.csv`.

Layout of `<run>/kaggle_bundle/`:

    kaggle_predict.py       the notebook runs this (installs, then predicts)
    requirements.txt        the pins of requirements-kaggle.txt
    wheels/                 those wheels for the notebook's Python, and this project's
    settings.json           template, budgets, batch size, combine, mean prompt, ...
    peft_adapter/           the run's adapter in PEFT's format (from the export stage)
    transformers/           or the merged model, when kaggle.base_model is "export"
    piece_model.model       the encoder's SentencePiece model, when a mean prompt is combined

Example:
```python
cfg = load_config("configs/kaggle_gpu_t4x2.yaml")
run_export_stage(cfg)
bundle = run_kaggle_bundle_stage(cfg)  # runs/<name>/kaggle_bundle/
```
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.errors import InputError, MissingInputError
from pipeline.models.model import read_model_spec, recovery_format
from pipeline.run.config import load_config
from pipeline.run.run_dir import RunDir, pushes_run
from pipeline.run.storage import adapter_settings_path
from pipeline.text.encoder import find_piece_model

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO_ROOT / "requirements-kaggle.txt"
NOTEBOOK_SCRIPT = REPO_ROOT / "scripts" / "kaggle_predict.py"
COMBINABLE = ("model", "mean_prompt")


def bundle_settings(cfg, recovery, mean_prompt, adapter, piece_model, end_of_turn):
    """What the notebook needs (settings.json): the prompt format the
    adapter was trained with (`recovery`: template, sequence_length,
    max_response_tokens), the token that ends the model family's turn, and
    generation and combination as `cfg` says."""
    template, sequence_length, max_response_tokens = recovery
    return {
        "base_model": cfg.kaggle.base_model,
        "adapter": adapter,
        "torch_dtype": cfg.kaggle.torch_dtype,
        "input": cfg.kaggle.input,
        "output": cfg.kaggle.output,
        "template": template,
        "sequence_length": sequence_length,
        "max_response_tokens": max_response_tokens,
        "batch_size": cfg.predict.batch_size,
        "max_new_tokens": cfg.predict.max_new_tokens,
        "end_of_turn": end_of_turn,
        "combine": cfg.predict.combine,
        "separator": cfg.predict.separator,
        "openings": cfg.predict.openings,
        "fallback": cfg.predict.fallback,
        "mean_prompt": mean_prompt,
        "piece_model": piece_model,
        "encoder_max_tokens": cfg.mean_prompt.max_tokens,
        # What the wheels were fetched for: the notebook checks it before installing.
        "python_version": cfg.kaggle.python_version,
        "platforms": cfg.kaggle.platforms,
    }


@pushes_run
def run_kaggle_bundle_stage(cfg, log=print):
    """Builds the bundle from the run's export (and mean prompt); fetches
    the wheels from the package index. Returns the bundle folder."""
    run = RunDir(cfg)
    unknown = [part for part in cfg.predict.combine if part not in COMBINABLE]
    if unknown:
        raise InputError(
            f"predict.combine: the Kaggle bundle combines only {' and '.join(COMBINABLE)}; "
            f"{unknown[0]!r} would need that submission inside the notebook"
        )
    merged = cfg.kaggle.base_model == "export"
    source = run.transformers_model if merged else run.peft_adapter
    if not source.exists():
        merged_off = " with export.merged=true" if merged and not cfg.export.merged else ""
        raise MissingInputError(
            f"{source} not found; run the export stage first (make export{merged_off})"
        )
    bundle = run.start_stage(cfg, cfg.kaggle.out)
    for leftover in ("transformers", "peft_adapter"):
        shutil.rmtree(bundle / leftover, ignore_errors=True)
    shutil.copytree(source, bundle / source.name)
    mean_prompt, piece_model = None, None
    if "mean_prompt" in cfg.predict.combine:
        if not run.mean_prompt.exists():
            raise MissingInputError(f"{run.mean_prompt} not found; run the mean-prompt stage first")
        mean_prompt = run.mean_prompt.read_text().strip()
    if cfg.predict.combine != ["model"]:
        piece_model = "piece_model.model"
        shutil.copyfile(
            find_piece_model(cfg.score.encoder, cfg.mean_prompt.piece_model), bundle / piece_model
        )
    # The prompt format the exported adapter was trained with: its json's,
    # else the finetune stage's config (adapters from before the json said).
    trained_config = run.root / cfg.train.out / "config.yaml"
    trained = load_config(trained_config) if trained_config.exists() else cfg
    adapter_json = adapter_settings_path(run.export_adapter) if run.export_adapter else None
    adapter = json.loads(adapter_json.read_text()) if adapter_json and adapter_json.exists() else {}
    recovery = recovery_format(adapter, trained.train, lambda line: log(f"kaggle-bundle: {line}"))
    end_of_turn = read_model_spec(trained.model.preset).family.end_of_turn
    settings = bundle_settings(
        cfg, recovery, mean_prompt, None if merged else source.name, piece_model, end_of_turn
    )
    (bundle / "settings.json").write_text(json.dumps(settings, indent=2))
    shutil.copyfile(REQUIREMENTS, bundle / "requirements.txt")
    shutil.copyfile(NOTEBOOK_SCRIPT, bundle / NOTEBOOK_SCRIPT.name)
    fetch_wheels(cfg.kaggle, bundle / "wheels", log)
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    log(f"kaggle-bundle: {size / 2**20:.1f} MiB -> {bundle} (upload it as a Kaggle dataset)")
    return bundle


def fetch_wheels(kaggle_cfg, folder, log=print):
    """requirements-kaggle.txt's wheels for the notebook's Python and
    platform, and a wheel of this project."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("prompt_recovery-*.whl"):
        old.unlink()
    platforms = [arg for platform in kaggle_cfg.platforms for arg in ("--platform", platform)]
    log(
        f"kaggle-bundle: wheels for Python {kaggle_cfg.python_version} "
        f"({', '.join(kaggle_cfg.platforms)})"
    )
    _pip(
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        kaggle_cfg.python_version,
        *platforms,
        "-r",
        str(REQUIREMENTS),
        "-d",
        str(folder),
    )
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), str(REPO_ROOT))


def _pip(*args):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "-q", *args], capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"pip {args[0]} failed:\n{done.stderr.strip()[-2000:]}")
