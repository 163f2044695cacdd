"""The finetune stage in-process: the same config and seed give the same
adapter, bit for bit, whatever ran before it in the process."""

import dataclasses

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data import run_data_stage
from pipeline.finetune import run_finetune_stage
from pipeline.mean_prompt import run_mean_prompt_stage
from pipeline.predict import run_predict_stage
from processes import run_stage
from test_pod import lora_weights

pytestmark = pytest.mark.slow

SETTINGS = ["data.max_rows=64", "train.epochs=1", "predict.adapter=none", "mean_prompt.steps=2"]


def test_same_adapter_alone_or_after_other_stages(tiny, tmp_path):
    cfg = load_config(None, SETTINGS + [f"run.root={tmp_path}"])
    quiet = dict(log=lambda *_: None)
    run_data_stage(cfg, **quiet)
    run_mean_prompt_stage(cfg, **quiet)  # TensorFlow and the encoder
    run_predict_stage(cfg, **quiet)  # the model, its decoder, Keras' random state
    after_others = run_finetune_stage(cfg, **quiet)
    alone = tmp_path / cfg.run.name / "finetune_alone" / "adapter.lora.h5"
    run_stage("finetune", SETTINGS + [f"run.root={tmp_path}", "train.out=finetune_alone"], log_dir=tmp_path)
    expected, got = lora_weights(after_others), lora_weights(alone)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
