"""The finetune stage: LoRA on Gemma for prompt recovery.

Reads the data CSV, splits it (train / validation / holdout, contiguous),
trains LoRA weights with the loss on response tokens only, and writes into
the run's finetune folder: `adapter.lora.h5` (+ `adapter.json`),
`history.json`, `loss_curve.png` and TensorBoard logs (`tensorboard/`).

Example:
```python
cfg = load_config("configs/cpu_tiny.yaml", ["train.epochs=2"])
adapter_path = run_finetune_stage(cfg)
```
"""

import json
import time
import warnings

import keras
import numpy as np

from pipeline import flops, plots
from pipeline.distribution import is_main_process
from pipeline.model import enable_lora, load_gemma, read_backbone_config, save_adapter
from pipeline.recovery import RecoveryFormatter, count_tokens
from pipeline.run_dir import RunDir
from pipeline.runtime import set_seed
from pipeline.tables import TRAIN_COLUMNS, read_table, split_rows

TEXT_COLUMNS = ["original_text", "rewrite_prompt", "rewritten_text"]


def load_splits(csv_path, split_cfg, log=print):
    """(train, validation) rows; empty texts dropped after the split, so
    the holdout rows stay the same whatever the other parts hold."""
    df = read_table(csv_path, TRAIN_COLUMNS, TEXT_COLUMNS, empty="keep", log=log)
    train_rows, val_rows, _ = split_rows(len(df), split_cfg)
    parts = []
    for name, rows in (("train", train_rows), ("validation", val_rows)):
        part = df.iloc[list(rows)]
        blank = (part[TEXT_COLUMNS].apply(lambda c: c.str.strip() == "")).any(axis=1)
        if blank.any():
            log(f"finetune: dropped {int(blank.sum())} {name} row(s) with an empty text")
        parts.append(part[~blank].reset_index(drop=True))
    return parts


def run_finetune_stage(cfg, log=print):
    run = RunDir(cfg)
    stage_dir = run.start_stage(cfg, cfg.train.out)
    train_df, val_df = load_splits(run.train_csv, cfg.split, log)
    tc = cfg.train
    if len(train_df) < tc.batch_size:
        raise ValueError(
            f"{run.train_csv}: {len(train_df)} training rows, fewer than train.batch_size={tc.batch_size}"
        )
    set_seed(tc.seed)
    causal_lm, tokenizer = load_gemma(cfg, [tc.batch_size])
    enabled = enable_lora(causal_lm, cfg.lora)
    trainable = sum(int(np.prod(w.shape)) for w in causal_lm.trainable_weights)
    log(f"finetune: LoRA rank {cfg.lora.rank} on {len(enabled)} layers, {trainable:,} trainable weights")

    formatter = RecoveryFormatter(tokenizer, tc.template, tc.sequence_length, tc.max_response_tokens)
    train_df, cut_train = formatter.fit_texts(train_df)
    val_df, cut_val = formatter.fit_texts(val_df)
    log(
        f"finetune: {len(train_df)} train / {len(val_df)} validation rows; texts cut to fit "
        f"sequence_length={tc.sequence_length}: {cut_train} train, {cut_val} validation"
    )
    train_ds = formatter.training_dataset(
        train_df, tc.batch_size, shuffle_seed=tc.seed, length_step=tc.length_step or None
    )
    steps_per_epoch, real_tokens, computed_tokens = count_tokens(train_ds)
    log(
        f"finetune: {steps_per_epoch} steps per epoch, {real_tokens:,} real of {computed_tokens:,} "
        f"computed tokens ({real_tokens / computed_tokens:.1%} real, length_step={tc.length_step})"
    )
    val_ds = formatter.training_dataset(val_df, tc.batch_size, pad_to_batch=True) if len(val_df) else None

    optimizer = keras.optimizers.AdamW(learning_rate=tc.learning_rate, weight_decay=tc.weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    causal_lm.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    throughput = Throughput(
        real_tokens,
        flops.train_flops_per_token(read_backbone_config(cfg.model.preset), tc.sequence_length),
        cfg.distribution.peak_tflops_per_device,
        len(keras.distribution.list_devices()),
    )
    progress = StepLog(steps_per_epoch, tc.epochs, log, throughput)
    callbacks = [progress]
    if is_main_process():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(stage_dir / "tensorboard")))
    with warnings.catch_warnings():
        # Length buckets make the number of batches per epoch unknown up
        # front; Keras then warns at the end of each epoch's data, which is
        # just where an epoch should end.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        history = causal_lm.fit(
            train_ds, validation_data=val_ds, epochs=tc.epochs, callbacks=callbacks, verbose=0
        )
    if is_main_process():
        save_adapter(causal_lm, cfg.lora, run.adapter)
        epochs = {k: [float(v) for v in vs] for k, vs in history.history.items()}
        (stage_dir / "history.json").write_text(
            json.dumps(
                {
                    "step_loss": progress.step_losses,
                    "epochs": epochs,
                    "real_token_fraction": real_tokens / computed_tokens,
                    "epoch_throughput": progress.epoch_throughput,
                },
                indent=2,
            )
        )
        plots.loss_curve(
            progress.step_losses, epochs.get("val_loss", []), steps_per_epoch, stage_dir / "loss_curve.png"
        )
    if "val_loss" in history.history:
        log(f"finetune: validation loss {history.history['val_loss'][-1]:.4f}")
    log(f"finetune: adapter -> {run.adapter}")
    return run.adapter


class Throughput:
    """Real (non-padding) tokens per second and the MFU they mean."""

    def __init__(self, real_tokens_per_epoch, flops_per_token, peak_tflops_per_device, n_devices):
        self.real_tokens_per_epoch = real_tokens_per_epoch
        self.flops_per_token = flops_per_token
        self.peak = peak_tflops_per_device
        self.n_devices = n_devices

    def of_epoch(self, seconds):
        tokens_per_second = self.real_tokens_per_epoch / seconds
        return {
            "seconds": round(seconds, 2),
            "real_tokens_per_second": round(tokens_per_second, 1),
            "mfu": flops.mfu(tokens_per_second, self.flops_per_token, self.peak, self.n_devices),
        }


class StepLog(keras.callbacks.Callback):
    """Records the loss after every step (Keras reports the running mean
    over the epoch), prints progress now and then, and measures each epoch's
    training throughput (validation excluded; epoch 1 includes compiling)."""

    def __init__(self, steps_per_epoch, epochs, log, throughput, lines_per_epoch=5):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.log = log
        self.throughput = throughput
        self.every = max(1, steps_per_epoch // lines_per_epoch)
        self.step_losses = []
        self.epoch_throughput = []
        self.start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = self.last_step_end = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.last_step_end = time.perf_counter()
        self.step_losses.append(float(logs["loss"]))
        step = len(self.step_losses)
        if step % self.every == 0:
            total = self.steps_per_epoch * self.epochs
            rate = step / (time.perf_counter() - self.start)
            self.log(f"finetune: step {step}/{total}, loss {self.step_losses[-1]:.4f}, {rate:.2f} steps/s")

    def on_epoch_end(self, epoch, logs=None):
        measured = self.throughput.of_epoch(self.last_step_end - self.epoch_start)
        self.epoch_throughput.append(measured)
        val = f", validation loss {logs['val_loss']:.4f}" if "val_loss" in logs else ""
        mfu = f", MFU {measured['mfu']:.3f}" if measured["mfu"] is not None else ""
        self.log(
            f"finetune: epoch {epoch + 1}/{self.epochs} done, loss {logs['loss']:.4f}{val}; "
            f"{measured['real_tokens_per_second']:,.0f} real tokens/s{mfu}"
        )
