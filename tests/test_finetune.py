"""The finetune stage: its loss, and the same adapter, bit for bit, for the
same config and seed, whatever ran before it in the process."""

import numpy as np
import pandas as pd
import pytest
from processes import run_stage
from test_pod import lora_weights

from pipeline.models.lora_training import compile_lora_training
from pipeline.run.config import TrainConfig, load_config
from pipeline.stages.data import run_data_stage
from pipeline.stages.finetune import run_finetune_stage
from pipeline.stages.mean_prompt import run_mean_prompt_stage
from pipeline.stages.predict import run_predict_stage
from pipeline.text.batching import Batch
from pipeline.text.recovery import RecoveryFormatter
from pipeline.text.templates import RECOVERY_TEMPLATE

SETTINGS = ["data.max_rows=64", "train.epochs=1", "predict.adapter=none", "mean_prompt.steps=2"]


def test_loss_is_the_mean_over_response_tokens_whatever_the_padding(tiny, tiny_model):
    import keras
    import keras_hub

    _, tokenizer = tiny_model
    causal_lm = keras_hub.models.GemmaCausalLM.from_preset(str(tiny.preset), preprocessor=None)
    compile_lora_training(causal_lm, TrainConfig())
    formatter = RecoveryFormatter(tokenizer, RECOVERY_TEMPLATE, 512, 32)
    df = pd.DataFrame(
        {
            "original_text": ["The cat sat.", "A dog ran far away."],
            "rewritten_text": ["THE CAT SAT.", "a dog ran"],
            "rewrite_prompt": ["Upper case.", "Shorter and lower case please."],
        }
    )
    rows, _ = formatter.encode(df)
    losses = []
    for length in (320, 512):  # the same rows in a short and in a long bucket
        x, y, w = rows.arrays(Batch((0, 1), length))
        logits = np.asarray(causal_lm(x), np.float64)
        log_p = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        token_loss = -np.take_along_axis(log_p, y[..., None], axis=-1)[..., 0]
        by_hand = (token_loss * w).sum() / w.sum()  # the mean over the response tokens
        computed = causal_lm.compute_loss(
            x=x, y=y, y_pred=keras.ops.convert_to_tensor(logits, "float32"), sample_weight=w
        )
        np.testing.assert_allclose(float(computed), by_hand, rtol=1e-5)
        losses.append(by_hand)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


@pytest.mark.slow
def test_same_adapter_alone_or_after_other_stages(tiny, tmp_path):
    cfg = load_config(None, SETTINGS + [f"run.root={tmp_path}"])
    quiet = dict(log=lambda *_: None)
    run_data_stage(cfg, **quiet)
    run_mean_prompt_stage(cfg, **quiet)  # TensorFlow and the encoder
    run_predict_stage(cfg, **quiet)  # the model, its decoder, Keras' random state
    after_others = run_finetune_stage(cfg, **quiet)
    alone = tmp_path / cfg.run.name / "finetune_alone" / "adapter.lora.h5"
    run_stage(
        "finetune",
        SETTINGS + [f"run.root={tmp_path}", "train.out=finetune_alone"],
        log_dir=tmp_path,
    )
    expected, got = lora_weights(after_others), lora_weights(alone)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
