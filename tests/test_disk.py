"""The disk plan: what a run writes, against the files the demo wrote, and
the refusal before training when a run will not fit."""

import dataclasses
from pathlib import Path

import pytest
from specs import GEMMA_7B, GEMMA_TINY

from pipeline.errors import InputError
from pipeline.models.disk import check_disk, plan_disk
from pipeline.models.memory import GIB
from pipeline.run.config import load_config


@pytest.mark.slow
def test_plan_matches_the_files_the_demo_run_writes(demo_run):
    from test_export import run_export

    cfg, _, _ = demo_run
    plan = plan_disk(cfg, GEMMA_TINY)
    paths = run_export(cfg)
    run = cfg.run.root + "/" + cfg.run.name
    written = {
        "adapter": f"{run}/finetune/adapter.lora.h5",
        "peft_export": paths["peft_adapter"] / "adapter_model.safetensors",
        "merged_export": paths["transformers"] / "model.safetensors",
    }
    for field, path in written.items():
        # The plan counts the arrays; the files add headers and small extras
        # (h5 groups): measured 0.1-15% on the tiny model.
        planned, size = getattr(plan, field), Path(path).stat().st_size
        assert planned <= size <= planned * 1.02 + 2**16, (field, planned, size)
    checkpoints = sorted(Path(run, "finetune", "checkpoints").iterdir(), key=lambda p: int(p.name))
    assert len(checkpoints) == cfg.train.keep_checkpoints
    size = sum(f.stat().st_size for f in checkpoints[-1].rglob("*") if f.is_file())
    # Orbax compresses the arrays (zstd) and adds its metadata files:
    # measured 1.04x the arrays on the tiny model.
    assert 0.8 * plan.checkpoint <= size <= 1.2 * plan.checkpoint, (plan.checkpoint, size)


def test_kaggle_configs_fit_the_working_folder_and_say_what_to_change_when_not(tmp_path):
    cfg = load_config("configs/kaggle_tpu_v3_8.yaml")
    plan = plan_disk(cfg, GEMMA_7B)
    assert plan.total < cfg.run.disk_limit_gib * GIB and plan.merged_export == 0
    check_disk(plan, tmp_path)
    merged = plan_disk(
        load_config("configs/kaggle_tpu_v3_8.yaml", ["export.merged=true"]), GEMMA_7B
    )
    assert merged.merged_export > 15 * GIB  # Gemma 7B in bfloat16
    with pytest.raises(
        InputError, match=r"more than run.disk_limit_gib=18.6; .*set export.merged=false"
    ):
        check_disk(merged, tmp_path)
    assert "does NOT fit" in merged.report()


def test_what_the_working_folder_holds_already_counts_against_the_limit(tmp_path):
    """Kaggle's 20 GB cap is on /kaggle/working, where the clone and its
    .venv (TensorFlow, libtpu and jaxlib: about 3.5 GB) already are."""
    cfg = load_config("configs/kaggle_tpu_v5e_8.yaml")
    assert cfg.run.disk_limit_folder == "/kaggle/working"
    plan = plan_disk(cfg, GEMMA_7B)
    working = tmp_path / "working"
    venv = working / "prompt-recovery" / ".venv" / "lib"
    venv.mkdir(parents=True)
    room = cfg.run.disk_limit_gib * GIB - plan.total  # about 1.6 GiB: not a whole .venv
    with open(venv / "libtpu.so", "wb") as f:  # sparse: its size, not its blocks, on disk
        f.truncate(int(room) - GIB // 2)
    (working / "notes.txt").write_text("x" * 1000)
    logs = []
    check_disk(plan, working / "prompt-recovery" / "runs", logs.append, working)
    assert f"holds {(room - GIB // 2) / GIB:.1f} GiB already (prompt-recovery " in logs[0]
    assert ", notes.txt 0.0)" in logs[0]
    with open(venv / "libtpu.so", "wb") as f:
        f.truncate(int(room) + 2**20)
    with pytest.raises(InputError, match=r"already holds .*VENV=/tmp/prompt-recovery-venv"):
        check_disk(plan, working / "prompt-recovery" / "runs", logs.append, working)
    check_disk(plan, tmp_path / "runs", logs.append, tmp_path / "no-such-folder")  # nothing held
    unlimited = dataclasses.replace(plan, limit_gib=None)  # a folder, but no limit to count it for
    check_disk(unlimited, working / "prompt-recovery" / "runs", logs.append, working)


def test_in_a_kaggle_notebook_make_puts_the_venv_outside_the_working_folder():
    import os
    import subprocess

    from processes import ROOT

    def venv_made(**env):
        dry = subprocess.run(
            ["make", "-n", "install", "REQUIREMENTS=requirements-tpu.txt"],
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")} | env,
            capture_output=True,
            text=True,
            check=True,
        )
        return dry.stdout.splitlines()[0]

    assert (
        venv_made(KAGGLE_KERNEL_RUN_TYPE="Interactive")
        == "python3 -m venv /tmp/prompt-recovery-venv"
    )
    assert venv_made() == "python3 -m venv .venv"


def test_peft_export_stores_the_block_diagonal_b_dense():
    rank4 = load_config(
        "configs/kaggle_tpu_v3_8.yaml", ["lora.rank=4", "lora.target_layers=[query]"]
    )
    plan = plan_disk(rank4, GEMMA_7B)
    heads, hidden, head_dim, layers = 16, 3072, 256, 28
    a, b = heads * hidden * 4, heads * head_dim * heads * 4
    assert plan.peft_export == (a + b) * layers * 4


@pytest.mark.parametrize(
    "setting, said",
    [
        (("run", "disk_limit_gib", 1e-6), "more than run.disk_limit_gib=1e-06"),
        (  # Mistral's name for a Gemma model
            ("lora", "target_layers", ["query", "feedforward_gate_dense"]),
            "feedforward_gate_dense: no such layer in a gemma model, whose projections are "
            "query, key, value, attention_output, ffw_gating, ffw_gating_2, ffw_linear",
        ),
    ],
)
def test_finetune_refuses_a_run_it_cannot_do_before_it_loads_the_model(tiny_cfg, setting, said):
    import pandas as pd

    from pipeline.stages.finetune import run_finetune_stage

    train_csv = Path(tiny_cfg.run.root) / "train.csv"
    pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(40)],
            "original_text": ["a text"] * 40,
            "rewrite_prompt": ["Make it shorter."] * 40,
            "rewritten_text": ["text"] * 40,
        }
    ).to_csv(train_csv, index=False)
    tiny_cfg.train.data = str(train_csv)
    section, key, value = setting
    setattr(getattr(tiny_cfg, section), key, value)
    logs = []
    with pytest.raises(InputError, match=said):
        run_finetune_stage(tiny_cfg, log=logs.append)
    assert not any("LoRA rank" in line for line in logs)  # stopped before the model was loaded


@pytest.mark.parametrize("keep", [1, 2])
def test_the_checkpoint_being_written_counts_beside_the_kept_ones(keep):
    """Orbax writes the new checkpoint before it deletes the oldest one."""
    cfg = load_config("configs/kaggle_tpu_v3_8.yaml", [f"train.keep_checkpoints={keep}"])
    plan = plan_disk(cfg, GEMMA_7B)
    assert plan.checkpoints == (keep + 1) * plan.checkpoint
    assert plan.total == pytest.approx(
        plan.adapter + (keep + 1) * plan.checkpoint + plan.peft_export + plan.bundle
    )
