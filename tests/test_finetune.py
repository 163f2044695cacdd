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


def test_the_schedule_warms_up_then_decays_over_optimizer_updates():
    from pipeline.models.lora_training import WarmupDecay, learning_rate

    # 2 warm-up updates, then 4 more to the end; 2 batches per update.
    def at(kind, batch):
        return float(WarmupDecay(1.0, 2, 6, kind, accumulation=2)(batch))

    for kind in ("constant", "linear", "cosine"):
        assert [at(kind, b) for b in range(4)] == [0.5, 0.5, 1.0, 1.0]  # warming
        assert at(kind, 4) == pytest.approx(1.0)  # the first update after
    assert [at("linear", b) for b in (6, 8, 10, 11)] == pytest.approx([0.75, 0.5, 0.25, 0.25])
    assert [at("cosine", b) for b in (6, 8, 10)] == pytest.approx([0.8535534, 0.5, 0.1464466])
    assert at("constant", 10) == 1.0
    assert learning_rate(TrainConfig(), 100) == TrainConfig().learning_rate  # no schedule
    scheduled = learning_rate(
        TrainConfig(schedule="cosine", warmup_steps=3, gradient_accumulation=4), 100
    )
    assert (scheduled.updates, scheduled.warmup, scheduled.accumulation) == (25, 3, 4)


def accumulation_batch():
    """8 rows of 32 tokens whose responses (the weighted tokens) are the same
    length, so the mean loss of 8 is the mean of its two halves' means."""
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(3, 1000, (8, 32)).astype("int32"),
        "padding_mask": np.ones((8, 32), bool),
    }
    y = rng.integers(3, 1000, (8, 32)).astype("int32")
    weight = np.zeros((8, 32), "float32")
    weight[:, 24:] = 1.0
    return x, y, weight


def fresh_lora_model(tiny, train_cfg, total_batches=0):
    """The tiny Gemma with rank-4 LoRA (seed 0), compiled for `train_cfg`."""
    import keras_hub

    from pipeline.models.model import enable_lora
    from pipeline.parallel.runtime import set_seed
    from pipeline.run.config import LoraConfig

    causal_lm = keras_hub.models.GemmaCausalLM.from_preset(
        str(tiny.preset), preprocessor=None, dtype="float32"
    )
    set_seed(0)
    enable_lora(causal_lm, LoraConfig(rank=4, target_layers=["query", "value"]))
    compile_lora_training(causal_lm, train_cfg, total_batches)
    return causal_lm


def test_the_optimizer_follows_the_schedule_in_updates_not_batches(tiny):
    train_cfg = TrainConfig(
        learning_rate=1.0, schedule="linear", warmup_steps=2, gradient_accumulation=2
    )
    causal_lm = fresh_lora_model(tiny, train_cfg, total_batches=8)  # 4 updates
    x, y, weight = accumulation_batch()
    rates = []
    for _ in range(7):
        rates.append(float(causal_lm.optimizer.learning_rate))
        causal_lm.train_on_batch({k: v[:4] for k, v in x.items()}, y[:4], weight[:4])
    # Updates 0 and 1 warm up (0.5, 1.0); 2 and 3 decay linearly (1.0, 0.5).
    assert rates == pytest.approx([0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 0.5])


def trained(tiny, accumulation, halves, store_between=None):
    """A fresh tiny Gemma with rank-4 LoRA (seed 0) after `halves` of the
    batch, one train_on_batch each; with `store_between`, saved after the
    first and restored into another fresh model before the second."""
    from pipeline.parallel.checkpoint import CheckpointStore, Progress

    def fresh():
        return fresh_lora_model(tiny, TrainConfig(gradient_accumulation=accumulation))

    x, y, weight = accumulation_batch()
    causal_lm = fresh()
    for number, rows in enumerate(halves):
        if store_between and number == 1:
            store = CheckpointStore(store_between, {}, keep=1)
            causal_lm.jax_state_sync()
            store.save(causal_lm, Progress(step=1))
            store.close()
            causal_lm = fresh()
            store = CheckpointStore(store_between, {}, keep=1)
            assert store.restore(causal_lm).step == 1
            store.close()
        causal_lm.train_on_batch({k: v[rows] for k, v in x.items()}, y[rows], weight[rows])
    causal_lm.jax_state_sync()
    return [np.asarray(v.value) for v in causal_lm.trainable_variables]


def test_two_accumulated_batches_of_4_rows_update_as_one_of_8_also_across_a_resume(tiny, tmp_path):
    whole = trained(tiny, 1, [slice(0, 8)])
    accumulated = trained(tiny, 2, [slice(0, 4), slice(4, 8)])
    resumed = trained(tiny, 2, [slice(0, 4), slice(4, 8)], store_between=tmp_path / "ckpt")
    only_first = trained(tiny, 2, [slice(0, 4)])  # half an accumulation: no update yet
    initial = trained(tiny, 1, [])
    for w, a, r, f, i in zip(whole, accumulated, resumed, only_first, initial, strict=True):
        np.testing.assert_allclose(a, w, atol=2e-6)
        np.testing.assert_array_equal(r, a)
        np.testing.assert_array_equal(f, i)
    assert any(not np.array_equal(w, i) for w, i in zip(whole, initial, strict=True))


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
