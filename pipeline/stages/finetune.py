"""The finetune stage: LoRA on the model (any family) for prompt recovery.

Reads the data CSV, splits it (train / validation / holdout, contiguous),
trains LoRA weights with the loss on response tokens only, scores the model
on validation rows by the competition's metric as it trains
(`validation_score.py`), and writes into the run's finetune folder:
`adapter.lora.h5` (+ `adapter.json`), `best.lora.h5` (+ `best.json`: the
best-scoring step), `history.json`, `loss_curve.png` and TensorBoard logs
(`tensorboard/`).
Checkpoints (`checkpoints/`, or `train.checkpoint_dir`) let a rerun resume,
also after a preemption notice (SIGTERM), at which the stage saves the step
every host has reached and exits with `PREEMPTED_EXIT_CODE`.

Example:
```python
cfg = load_config("configs/cpu_tiny.yaml", ["train.epochs=2"])
adapter_path = run_finetune_stage(cfg)
```
"""

import dataclasses
import hashlib
import json
import time

import keras
import numpy as np

from pipeline.errors import InputError
from pipeline.models import flops
from pipeline.models.disk import check_disk, plan_disk
from pipeline.models.lora_training import compile_lora_training
from pipeline.models.model import (
    enable_lora,
    family_of,
    forward_inputs,
    load_model,
    read_model_spec,
    save_adapter,
)
from pipeline.parallel import hosts, preemption
from pipeline.parallel.checkpoint import CheckpointStore, Progress, check_reachable
from pipeline.parallel.distribution import data_sharding
from pipeline.parallel.runtime import set_seed
from pipeline.run import plots
from pipeline.run.run_dir import RunDir, pushes_run
from pipeline.run.storage import adapter_settings_path
from pipeline.stages.validation_score import (
    ValidationScorer,
    ValidationTracking,
    best_evaluation,
)
from pipeline.text.batching import TrainingBatches, evaluation_batches
from pipeline.text.recovery import SHOT_COLUMNS, RecoveryFormatter, draw_shots
from pipeline.text.tables import TRAIN_COLUMNS, read_table, split_rows
from pipeline.text.templates import few_shot_template

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


def checkpoint_settings(cfg, rows):
    """Everything that shapes the training trajectory (a checkpoint resumes
    only under the same). The number of epochs is not among them, so a
    finished run can be trained on for more, nor the mesh: a checkpoint
    resumes on another mesh or number of hosts (the same steps, with sums
    taken in another order)."""
    tc = cfg.train
    digest = hashlib.sha256(b"".join(ids.tobytes() + b"|" for ids in rows.ids)).hexdigest()
    return {
        "training tokens (data, template, cuts)": digest,
        "model.preset": str(cfg.model.preset),
        "model.dtype": cfg.model.dtype,
        "lora": dataclasses.asdict(cfg.lora),
        "train.batch_size": tc.batch_size,
        "train.sequence_length": tc.sequence_length,
        "train.length_step": tc.length_step,
        "train.learning_rate": tc.learning_rate,
        "train.schedule": tc.schedule,
        "train.warmup_steps": tc.warmup_steps,
        "train.gradient_accumulation": tc.gradient_accumulation,
        "train.weight_decay": tc.weight_decay,
        "train.seed": tc.seed,
    }


def local_batches(rows, batches, batch_size, family):
    """tf.data of (x, y, sample_weight) of each batch, in order: the rows of
    the global batch that this process's devices hold (all of them in one
    process); x as the `family`'s model takes it."""
    import tensorflow as tf

    local = hosts.local_rows(data_sharding((batch_size, 1)), (batch_size, 1))
    n = local.stop - local.start

    def generate():
        for batch in batches:
            x, y, weight = rows.arrays(batch)
            yield (
                {key: value[local] for key, value in forward_inputs(family, x).items()},
                y[local],
                weight[local],
            )

    spec = lambda dtype: tf.TensorSpec((n, None), dtype)  # noqa: E731
    inputs = {"token_ids": spec(tf.int32), "padding_mask": spec(tf.bool)}
    if family.position_ids:
        inputs["position_ids"] = spec(tf.int32)
    signature = (inputs, spec(tf.int32), spec(tf.float32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(len(batches))).prefetch(2)


@pushes_run
def run_finetune_stage(cfg, log=print):
    tc = cfg.train
    run = RunDir(cfg)
    stage_dir = run.start_stage(cfg, tc.out)
    train_df, val_df = hosts.share_from_main(lambda: load_splits(run.train_csv, cfg.split, log))
    if len(train_df) < tc.batch_size:
        raise InputError(
            f"{run.train_csv}: {len(train_df)} training rows, fewer than "
            f"train.batch_size={tc.batch_size}"
        )
    if tc.keep_checkpoints < 1:
        raise InputError(
            f"train.keep_checkpoints={tc.keep_checkpoints}: keep at least 1 checkpoint to resume "
            "from"
        )
    if tc.gradient_accumulation < 1 or tc.warmup_steps < 0:
        raise InputError(
            f"train.gradient_accumulation={tc.gradient_accumulation}, "
            f"train.warmup_steps={tc.warmup_steps}: give 1 or more batches per update, 0 or more "
            "warm-up updates"
        )
    if min(tc.eval_rows, tc.eval_every, tc.early_stop, tc.shots) < 0:
        raise InputError(
            f"train.eval_rows={tc.eval_rows}, train.eval_every={tc.eval_every}, "
            f"train.early_stop={tc.early_stop}, train.shots={tc.shots}: give 0 or more (0 turns "
            "each off)"
        )
    # Before any weight is loaded: which layers LoRA adapts (a name the model
    # lacks stops here), and will what the run writes fit?
    spec = read_model_spec(cfg.model.preset)
    targets = spec.lora_targets(cfg.lora.target_layers)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, target_layers=targets))
    plan = plan_disk(cfg, spec)
    hosts.share_from_main(lambda: check_disk(plan, run.root, log, cfg.run.disk_limit_folder))
    causal_lm, tokenizer = load_model(cfg, [tc.batch_size])
    set_seed(tc.seed)  # LoRA's initial factors depend on the seed alone
    enabled = enable_lora(causal_lm, cfg.lora)
    trainable = sum(int(np.prod(w.shape)) for w in causal_lm.trainable_weights)
    log(
        f"finetune: LoRA rank {cfg.lora.rank} on {len(enabled)} layers ({', '.join(targets)}), "
        f"{trainable:,} trainable weights"
    )
    if tc.shots:
        cfg, train_df = with_shots(cfg, tokenizer, train_df, log)
        tc = cfg.train
    train_rows, val_rows = encode_splits(tokenizer, tc, train_df, val_df, log)
    scorer = validation_scorer(causal_lm, tokenizer, cfg, val_df, log)
    batches = TrainingBatches(
        train_rows, tc.batch_size, tc.sequence_length, tc.length_step, tc.seed
    )
    log(
        f"finetune: {batches.steps_per_epoch} steps per epoch, {batches.real_tokens:,} real of "
        f"{batches.computed_tokens:,} computed tokens "
        f"({batches.real_tokens / batches.computed_tokens:.1%} "
        f"real, length_step={tc.length_step})"
    )
    total_batches = batches.steps_per_epoch * tc.epochs
    log_updates(tc, total_batches, log)
    compile_lora_training(causal_lm, tc, total_batches)
    check_reachable(run.checkpoints)
    store = CheckpointStore(
        run.checkpoints, checkpoint_settings(cfg, train_rows), tc.keep_checkpoints
    )
    try:
        progress = resume(store, causal_lm, batches.steps_per_epoch * tc.epochs, log)
        if not progress.step and hosts.is_main_process():  # a fresh start: no best yet
            for path in (run.best_adapter, adapter_settings_path(run.best_adapter)):
                path.unlink(missing_ok=True)
        tracking = scorer and ValidationTracking(
            scorer,
            progress,
            tc,
            batches.steps_per_epoch,
            lambda step, score: save_adapter(
                causal_lm, cfg, run.best_adapter, step=step, validation_score=score
            ),
            stage_dir / "tensorboard" / "validation" if hosts.is_main_process() else None,
            log,
        )
        training = Training(
            cfg, causal_lm, batches, (train_rows, val_rows), store, progress, stage_dir, tracking
        )
        with preemption.watching() as notice:
            train(training, notice, log)
    finally:
        store.close()  # waits for the last save
    save_adapter(causal_lm, cfg, run.adapter)
    if hosts.is_main_process():
        write_history(stage_dir, progress, batches)
    log(f"finetune: adapter -> {run.adapter}")
    return run.adapter


def with_shots(cfg, tokenizer, train_df, log):
    """(`cfg` whose template begins with `train.shots` worked examples, the
    training rows without them)."""
    tc = cfg.train
    drawn = draw_shots(
        tokenizer,
        train_df,
        tc.template,
        tc.shots,
        tc.seed,
        tc.sequence_length - tc.max_response_tokens,
    )
    shots = train_df.iloc[drawn][SHOT_COLUMNS].itertuples(index=False)
    template = few_shot_template(tc.template, shots)
    log(
        f"finetune: {tc.shots} worked example(s) before every prompt, training rows "
        f"{', '.join(map(str, drawn))} (drawn with train.seed, left out of training); the "
        "adapter keeps the template they make"
    )
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, template=template))
    return cfg, train_df.drop(train_df.index[drawn]).reset_index(drop=True)


def validation_scorer(causal_lm, tokenizer, cfg, val_df, log):
    """The scorer of the validation rows by the metric, or None (with the
    reason said) when there is nothing to evaluate."""
    if not cfg.train.eval_rows:
        return None
    if val_df.empty:
        log("finetune: no validation rows (split.validation): no validation score")
        return None
    return ValidationScorer(causal_lm, tokenizer, cfg, val_df)


def encode_splits(tokenizer, train_cfg, train_df, val_df, log):
    """Training and validation rows as tokens, texts cut to fit (counted)."""
    tc = train_cfg
    formatter = RecoveryFormatter(
        tokenizer, tc.template, tc.sequence_length, tc.max_response_tokens
    )
    train_df, cut_train = formatter.fit_texts(train_df)
    val_df, cut_val = formatter.fit_texts(val_df)
    train_rows, responses_cut = formatter.encode(train_df)
    val_rows, _ = formatter.encode(val_df)
    log(
        f"finetune: {len(train_df)} train / {len(val_df)} validation rows; texts cut to fit "
        f"sequence_length={tc.sequence_length}: {cut_train} train, {cut_val} validation; "
        f"{responses_cut} training response(s) cut to max_response_tokens={tc.max_response_tokens}"
    )
    return train_rows, val_rows


def log_updates(tc, total_batches, log):
    """Says how the batches make optimizer updates, and what is left over."""
    accumulation = tc.gradient_accumulation
    updates, left = divmod(total_batches, accumulation)
    schedule = f"learning rate {tc.learning_rate:g}, {tc.schedule}" + (
        f" after {tc.warmup_steps} warm-up updates" if tc.warmup_steps else ""
    )
    log(
        f"finetune: {updates} optimizer updates of {accumulation} batch(es) "
        f"({accumulation * tc.batch_size} rows each); {schedule}"
    )
    if left:
        log(
            f"finetune: the last {left} batch(es) complete no accumulation of "
            f"train.gradient_accumulation={accumulation}: they update nothing"
        )


def resume(store, causal_lm, total_steps, log):
    """The checkpoint's progress, loaded into the model (or a fresh start)."""
    progress = store.restore(causal_lm) or Progress()
    if progress.step >= total_steps:
        log(
            f"finetune: {store.folder} is at step {progress.step}/{total_steps}: training is "
            "complete "
            "(delete it to train again)"
        )
    elif progress.step:
        log(f"finetune: resuming from {store.folder} at step {progress.step}/{total_steps}")
    return progress


@dataclasses.dataclass
class Training:
    """What `train` trains and where it records: the model, its batch plan,
    the encoded (training, validation) rows, the checkpoints and progress,
    the stage folder, and the validation by the metric (or None)."""

    cfg: object
    causal_lm: object
    batches: TrainingBatches
    rows: tuple
    store: CheckpointStore
    progress: Progress
    stage_dir: object
    tracking: ValidationTracking | None


def train(training, notice, log):
    """Trains from `progress.step` to the last epoch's end: one `fit` per
    epoch (the first one from where the checkpoint left off), validation and
    a checkpoint after each; `tracking` scores by the metric and may end
    training early. Raises `Preempted` once `notice` has come and the step
    every host reached is saved."""
    cfg, causal_lm, batches, progress = (
        training.cfg,
        training.causal_lm,
        training.batches,
        training.progress,
    )
    (train_rows, val_rows), store, tracking = training.rows, training.store, training.tracking
    stage_dir = training.stage_dir
    tc = cfg.train
    per_epoch = batches.steps_per_epoch
    val_batches = evaluation_batches(val_rows, tc.batch_size, tc.sequence_length, tc.length_step)
    throughput = Throughput(
        flops.train_flops_per_token(read_model_spec(cfg.model.preset), tc.sequence_length),
        cfg.hardware.peak_tflops_per_device,
        len(keras.distribution.list_devices()),
    )
    step_log = StepLog(progress, per_epoch * tc.epochs, log)
    checkpointing = Checkpointing(store, progress, tc.checkpoint_every, per_epoch, notice)
    callbacks = [step_log, *([tracking] if tracking else []), checkpointing]
    if hosts.is_main_process():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(stage_dir / "tensorboard")))
    family = family_of(causal_lm)
    for epoch in range(progress.step // per_epoch, tc.epochs):
        if tracking and tracking.stale:
            log(
                f"finetune: stopped early at step {progress.step}: "
                f"train.early_stop={tc.early_stop} evaluations without a better validation score"
            )
            break
        todo = batches.epoch(epoch)[progress.step - epoch * per_epoch :]
        feed = local_batches(train_rows, todo, tc.batch_size, family)
        if hosts.process_count() > 1 and epoch == progress.step // per_epoch:
            log(
                f"finetune: process {hosts.process_index()} feeds {feed.element_spec[1].shape[0]} "
                "of the "
                f"{tc.batch_size} rows of every batch"
            )
        start = time.perf_counter()
        history = causal_lm.fit(
            feed,
            validation_data=local_batches(val_rows, val_batches, tc.batch_size, family)
            if val_batches
            else None,
            initial_epoch=epoch,
            epochs=epoch + 1,
            callbacks=callbacks,
            shuffle=False,
            verbose=0,
        )
        real_tokens = sum(len(train_rows.ids[r]) for b in todo for r in b.rows if r >= 0)
        measured = throughput.of(real_tokens, step_log.last_step_end - start)
        progress.epoch_throughput.append(measured)
        logs = {key: float(values[-1]) for key, values in history.history.items()}
        # The epoch's loss from its steps: whole even if the epoch was resumed.
        logs["loss"] = float(
            np.mean(progress.step_losses[epoch * per_epoch : (epoch + 1) * per_epoch])
        )
        for key, value in logs.items():
            progress.epochs.setdefault(key, []).append(value)
        if tracking:
            tracking.evaluate()
        store.save(causal_lm, progress)
        _log_epoch(log, epoch, tc.epochs, logs, measured)
        if checkpointing.preempted:  # noticed at this epoch's last step
            checkpointing.stop()


def write_history(stage_dir, progress, batches):
    best = best_evaluation(progress.evaluations) if progress.evaluations else None
    (stage_dir / "history.json").write_text(
        json.dumps(
            {
                "step_loss": progress.step_losses,
                "epochs": progress.epochs,
                "real_token_fraction": batches.real_tokens / batches.computed_tokens,
                "epoch_throughput": progress.epoch_throughput,
                "validation_score": progress.evaluations,
                "best": best,
            },
            indent=2,
        )
    )
    plots.loss_curve(
        progress.step_losses,
        progress.epochs.get("val_loss", []),
        batches.steps_per_epoch,
        stage_dir / "loss_curve.png",
        progress.evaluations,
        best,
    )


def _log_epoch(log, epoch, epochs, logs, measured):
    val = f", validation loss {logs['val_loss']:.4f}" if "val_loss" in logs else ""
    mfu = f", MFU {measured['mfu']:.3f}" if measured["mfu"] is not None else ""
    log(
        f"finetune: epoch {epoch + 1}/{epochs} done, loss {logs['loss']:.4f}{val}; "
        f"{measured['real_tokens_per_second']:,.0f} real tokens/s{mfu}"
    )


class Throughput:
    """Real (non-padding) tokens per second and the MFU they mean."""

    def __init__(self, flops_per_token, peak_tflops_per_device, n_devices):
        self.flops_per_token = flops_per_token
        self.peak = peak_tflops_per_device
        self.n_devices = n_devices

    def of(self, real_tokens, seconds):
        tokens_per_second = real_tokens / seconds
        return {
            "seconds": round(seconds, 2),
            "real_tokens_per_second": round(tokens_per_second, 1),
            "mfu": flops.mfu(tokens_per_second, self.flops_per_token, self.peak, self.n_devices),
        }


class StepLog(keras.callbacks.Callback):
    """Records each step's own loss in `progress.step_losses` (Keras
    reports the running mean since the start of `fit`, from which each
    step's loss follows) and prints progress now and then."""

    def __init__(self, progress, total_steps, log, lines=20):
        super().__init__()
        self.progress = progress
        self.total_steps = total_steps
        self.log = log
        self.every = max(1, total_steps // lines)

    def on_train_begin(self, logs=None):
        self.start = self.last_step_end = time.perf_counter()
        self.steps_in_fit, self.running_mean = 0, 0.0

    def on_train_batch_end(self, batch, logs=None):
        self.last_step_end = time.perf_counter()
        mean = float(logs["loss"])
        self.steps_in_fit += 1
        loss = self.steps_in_fit * mean - (self.steps_in_fit - 1) * self.running_mean
        self.running_mean = mean
        self.progress.step_losses.append(loss)
        self.progress.step += 1
        step = self.progress.step
        if step % self.every == 0:
            rate = self.steps_in_fit / (self.last_step_end - self.start)
            self.log(
                f"finetune: step {step}/{self.total_steps}, loss {loss:.4f}, {rate:.2f} steps/s"
            )


class Checkpointing(keras.callbacks.Callback):
    """Saves a checkpoint every `every` steps (0: only at epoch ends, which
    the stage saves itself, after validation), and at the step where every
    host has reached a preemption notice, after which it stops training
    (`Preempted`). At an epoch's last step it leaves both to the stage, so
    that the checkpoint holds the epoch's validation."""

    def __init__(self, store, progress, every, steps_per_epoch, notice):
        super().__init__()
        self.store = store
        self.progress = progress
        self.every = every
        self.steps_per_epoch = steps_per_epoch
        self.notice = notice
        self.preempted = False

    def on_train_batch_end(self, batch, logs=None):
        step = self.progress.step
        self.preempted = self.notice.reached(step)
        if step % self.steps_per_epoch == 0:
            return
        if self.preempted or (self.every and step % self.every == 0):
            self.model.jax_state_sync()  # fit keeps the newest values to itself
            self.store.save(self.model, self.progress)
        if self.preempted:
            self.stop()

    def stop(self):
        """Waits for the checkpoint of this step, then ends the stage."""
        self.store.wait()
        raise preemption.Preempted(
            f"finetune: preempted at step {self.progress.step}: its checkpoint is in "
            f"{self.store.folder}; "
            "rerun the stage to resume there"
        )
