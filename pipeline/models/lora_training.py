"""How LoRA trains: the optimizer, its learning-rate schedule and the loss,
shared by the finetune stage and the benchmark (which must time the stage's
own train step). Imports neither TensorFlow nor pandas, so the GPU benchmark
runs where they are missing.

A step of `fit` is one batch; with `train.gradient_accumulation` N, the
optimizer averages the gradients of N batches and updates once (Keras'
`gradient_accumulation_steps`; the accumulators are optimizer variables, so
a checkpoint between two updates keeps them). The schedule counts optimizer
updates: linear warm-up from 0 over `train.warmup_steps`, then constant,
linear or cosine decay to 0 at the last update.

Example:
```python
enable_lora(causal_lm, cfg.lora)
compile_lora_training(causal_lm, cfg.train, total_batches=steps_per_epoch * cfg.train.epochs)
causal_lm.train_on_batch(x, y, sample_weight=weight)
```
"""

import math

import keras
from keras import ops


class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup` updates, then `kind`
    (constant, linear or cosine decay to 0 at update `updates`). Keras calls
    it with its count of batches; `accumulation` batches make one update."""

    def __init__(self, peak, warmup, updates, kind, accumulation=1):
        self.peak, self.warmup, self.updates = float(peak), int(warmup), int(updates)
        self.kind, self.accumulation = kind, int(accumulation)

    def __call__(self, step):
        update = ops.cast(ops.floor_divide(ops.cast(step, "int32"), self.accumulation), "float32")
        warming = self.peak * (update + 1.0) / max(self.warmup, 1)
        done = ops.clip((update - self.warmup) / max(self.updates - self.warmup, 1), 0.0, 1.0)
        decayed = {
            "constant": self.peak + 0.0 * done,
            "linear": self.peak * (1.0 - done),
            "cosine": self.peak * 0.5 * (1.0 + ops.cos(math.pi * done)),
        }[self.kind]
        return ops.where(update < self.warmup, warming, decayed)

    def get_config(self):
        return dict(
            peak=self.peak,
            warmup=self.warmup,
            updates=self.updates,
            kind=self.kind,
            accumulation=self.accumulation,
        )


def learning_rate(train_cfg, total_batches):
    """AdamW's learning rate for a run of `total_batches` batches: the
    configured one, or its `WarmupDecay` schedule."""
    if train_cfg.schedule == "constant" and not train_cfg.warmup_steps:
        return train_cfg.learning_rate
    accumulation = train_cfg.gradient_accumulation
    return WarmupDecay(
        train_cfg.learning_rate,
        train_cfg.warmup_steps,
        total_batches // accumulation,
        train_cfg.schedule,
        accumulation,
    )


def compile_lora_training(causal_lm, train_cfg, total_batches=0):
    """AdamW (no decay on bias and scale) on the trainable (LoRA) weights,
    with the schedule and gradient accumulation `train_cfg` sets; the loss
    is the mean over the tokens that carry weight (the responses), whatever
    the padding of the batch."""
    accumulation = train_cfg.gradient_accumulation
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate(train_cfg, total_batches),
        weight_decay=train_cfg.weight_decay,
        gradient_accumulation_steps=accumulation if accumulation > 1 else None,
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    causal_lm.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        sampler="greedy",  # every stage decodes greedily (Mistral, Llama, Qwen default to top-k)
    )
    optimizer.build(causal_lm.trainable_variables)
