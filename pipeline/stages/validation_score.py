"""Validation by the competition's metric while the finetune stage trains.

The loss says how well the model predicts the true prompt's tokens; the
competition scores the prompt it generates. So at every epoch's end (and
every `train.eval_every` steps) the stage generates a prompt for the first
`train.eval_rows` validation rows, greedy as predict does, scores it against
the true one with the sentence encoder (`score.encoder`), and keeps the
adapter of the best score as `best.lora.h5`, its step and score in
`best.json` (`predict.adapter: best` uses it). With `train.early_stop: n`
training ends after n evaluations without a gain. Every host generates (the
model is sharded over all of them); process 0 scores.

Example:
```python
scorer = ValidationScorer(causal_lm, tokenizer, cfg, validation_df)
tracking = ValidationTracking(scorer, progress, cfg.train, steps_per_epoch, save_best)
causal_lm.fit(..., callbacks=[tracking, ...])  # evaluates every train.eval_every steps
tracking.evaluate()  # at an epoch's end
```
"""

import keras

from pipeline.models.generation import BatchedGenerator
from pipeline.parallel import hosts
from pipeline.text.combine import combine_parts
from pipeline.text.encoder import load_sentence_encoder, score_prompts
from pipeline.text.openings import model_outputs
from pipeline.text.recovery import RecoveryFormatter


class ValidationScorer:
    """The mean score of the model's prompts for the first
    `cfg.train.eval_rows` rows of `rows` (original_text, rewritten_text,
    rewrite_prompt), as predict's model part would be (its forced
    openings, `predict.openings`; an empty output replaced by
    `predict.fallback`). Batches of `train.batch_size` rows: their
    training step's activations outweigh their cache, so what trains also
    evaluates. The encoder is loaded now, so that a bad `score.encoder`
    stops the stage before it trains."""

    def __init__(self, causal_lm, tokenizer, cfg, rows):
        tc = cfg.train
        formatter = RecoveryFormatter(
            tokenizer, tc.template, tc.sequence_length, tc.max_response_tokens
        )
        rows, _ = formatter.fit_texts(rows.iloc[: tc.eval_rows].reset_index(drop=True))
        self.rows = len(rows)
        self.prompts = formatter.prompt_ids(rows)
        self.truth = list(rows["rewrite_prompt"])
        self.tokenizer, self.predict_cfg = tokenizer, cfg.predict
        self.batch_size = cfg.score.batch_size
        self.generator = BatchedGenerator(
            causal_lm, tokenizer, tc.batch_size, cfg.predict.max_new_tokens, log=lambda line: None
        )
        self.encoder = None

        def load_encoder():
            self.encoder = load_sentence_encoder(cfg.score.encoder)

        hosts.share_from_main(load_encoder)  # a bad handle fails on every host

    def __call__(self):
        prompts = self.predicted()
        return hosts.share_from_main(
            lambda: float(score_prompts(self.encoder, prompts, self.truth, self.batch_size).mean())
        )

    def predicted(self):
        """The prompts the model gives the rows now, as predict writes them."""
        pc = self.predict_cfg
        outputs = model_outputs(
            self.prompts, pc.openings, self.tokenizer, self.generator.texts, pc.separator
        )
        return combine_parts([outputs], pc.separator, pc.fallback)[0]


class ValidationTracking(keras.callbacks.Callback):
    """Evaluates with `scorer` every `train_cfg.eval_every` steps inside
    `fit` (the stage calls `evaluate` at epoch ends, before the epoch's
    checkpoint), records each score in `progress.evaluations`, calls
    `save_best(step, score)` at each new best, writes each score to
    TensorBoard in `tensorboard` (a folder, or None), and stops `fit` once
    `train_cfg.early_stop` evaluations in a row brought no gain. Goes before
    the checkpointing callback, so a checkpoint holds its step's score."""

    def __init__(
        self, scorer, progress, train_cfg, steps_per_epoch, save_best, tensorboard=None, log=print
    ):
        super().__init__()
        self.scorer = scorer
        self.progress = progress
        self.every = train_cfg.eval_every
        self.patience = train_cfg.early_stop
        self.steps_per_epoch = steps_per_epoch
        self.save_best = save_best
        self.tensorboard = tensorboard and ScalarWriter(tensorboard)
        self.log = log

    def on_train_batch_end(self, batch, logs=None):
        step = self.progress.step
        if self.every and step % self.every == 0 and step % self.steps_per_epoch:
            self.model.jax_state_sync()  # fit keeps the newest values to itself
            self.evaluate()
            if self.stale:
                self.model.stop_training = True

    def evaluate(self):
        """Scores the model as it is now, once per step."""
        evaluations, step = self.progress.evaluations, self.progress.step
        if evaluations and evaluations[-1]["step"] == step:
            return
        evaluations.append({"step": step, "score": self.scorer()})
        if self.tensorboard:
            self.tensorboard.write("validation_score", evaluations[-1]["score"], step)
        best = best_evaluation(evaluations)
        if best is evaluations[-1]:
            self.save_best(step, best["score"])
        self.log(
            f"finetune: step {step}, validation score {evaluations[-1]['score']:.4f} on "
            f"{self.scorer.rows} rows (best {best['score']:.4f} at step {best['step']})"
        )

    @property
    def stale(self):
        """True once `early_stop` evaluations followed the best one."""
        evaluations = self.progress.evaluations
        if not self.patience or not evaluations:
            return False
        return len(evaluations) - 1 - evaluations.index(best_evaluation(evaluations)) >= (
            self.patience
        )


class ScalarWriter:
    """TensorBoard scalars into `folder` (beside Keras' own logs), each on
    disk once written."""

    def __init__(self, folder):
        import tensorflow as tf

        self.writer = tf.summary.create_file_writer(str(folder))

    def write(self, name, value, step):
        import tensorflow as tf

        with self.writer.as_default():
            tf.summary.scalar(name, value, step=step)
        self.writer.flush()


def best_evaluation(evaluations):
    """The highest score, the earliest of equal ones (a later equal score is
    no gain)."""
    return max(evaluations, key=lambda e: (e["score"], -e["step"]))
