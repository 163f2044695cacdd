"""How LoRA trains: the optimizer and loss, shared by the finetune stage and
the benchmark (which must time the stage's own train step). Imports neither
TensorFlow nor pandas, so the GPU benchmark runs where they are missing.

Example:
```python
enable_lora(causal_lm, cfg.lora)
compile_lora_training(causal_lm, cfg.train)
causal_lm.train_on_batch(x, y, sample_weight=weight)
```
"""

import keras


def compile_lora_training(causal_lm, train_cfg):
    """AdamW (no decay on bias and scale) on the trainable (LoRA) weights;
    the loss is the mean over the tokens that carry weight (the responses),
    whatever the padding of the batch."""
    optimizer = keras.optimizers.AdamW(
        learning_rate=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay
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
