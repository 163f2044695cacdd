"""Where a run's stages read and write.

Every run lives in `<run.root>/<run.name>/`; each stage writes into its own
folder there (named by the stage's `out` key) and saves the resolved config
beside its outputs. On a pod only process 0 writes. A stage's inputs default
to the previous stage's outputs in the same run. When `run.root` is a bucket
(gs://...), the stages work in a local mirror of the run folder: each stage
pulls it first (`start_stage`) and pushes it back when it ends, also on an
error (`@pushes_run`), see `pipeline/run/storage.py`.

Example:
```python
run = RunDir(cfg)
stage_dir = run.start_stage(cfg, cfg.predict.out)  # mkdir + config.yaml
run.submission  # runs/<name>/predict/submission.csv
```
"""

import functools
from pathlib import Path

from pipeline.errors import InputError
from pipeline.parallel import hosts
from pipeline.parallel.checkpoint import check_tensorstore_writes
from pipeline.run.config import save_config
from pipeline.run.storage import (
    RunMirror,
    adapter_settings_path,
    check_writable,
    is_bucket,
    mirror_path,
)
from pipeline.text.tables import TEST_COLUMNS, read_header, read_table, split_rows


class RunDir:
    """The paths of one run (`<run.root>/<run.name>/`), from its config.

    Args:
        cfg: the run's `Config`.

    Example:
    ```python
    run = RunDir(cfg)
    stage_dir = run.start_stage(cfg, cfg.train.out)
    run.adapter  # runs/<name>/finetune/adapter.lora.h5
    ```
    """

    def __init__(self, cfg):
        self.cfg = cfg
        run = f"{cfg.run.root.rstrip('/')}/{cfg.run.name}"
        self.mirror = (
            RunMirror(run, mirror_path(run, cfg.run.mirrors)) if is_bucket(cfg.run.root) else None
        )
        self.root = self.mirror.local if self.mirror else Path(cfg.run.root) / cfg.run.name

    def start_stage(self, cfg, out):
        """Joins the pod if the config says multi_host (every stage starts
        here); process 0 checks that the run can be written (`check_writable`),
        pulls a bucket's run folder, makes the stage folder and saves the
        config."""
        hosts.initialize(cfg.distribution)
        hosts.share_from_main(self.check_writable)
        stage_dir = self.root / out
        if hosts.is_main_process():
            if self.mirror:
                self.mirror.pull(skip=[f"{cfg.train.out}/checkpoints"])  # Orbax reads them there
            stage_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, stage_dir / "config.yaml")
        return stage_dir

    def check_writable(self):
        """Raises InputError unless the run root and the checkpoint folder
        can be written by what writes them (gcsfs and tensorstore on a
        bucket): every stage checks, before it loads a model, so that a
        folder finetune could not save to stops the data stage, not the
        first checkpoint hours later."""
        check_writable(self.cfg.run.root, "run.root")
        key = "train.checkpoint_dir" if self.cfg.train.checkpoint_dir else "the checkpoint folder"
        if is_bucket(self.checkpoints):
            check_tensorstore_writes(str(self.checkpoints), key)
        else:
            check_writable(self.checkpoints, key)

    def push(self, path=None):
        """Process 0 copies the run folder (or `path` in it) to the run's
        bucket; nothing when the run is local."""
        if self.mirror and hosts.is_main_process():
            self.mirror.push(path)

    @property
    def checkpoints(self):
        """finetune's checkpoint folder: train.checkpoint_dir, else in the
        run folder (on the bucket itself when the run is on one)."""
        train = self.cfg.train
        if train.checkpoint_dir:
            return train.checkpoint_dir
        return (
            f"{self.mirror.remote}/{train.out}/checkpoints"
            if self.mirror
            else self.root / train.out / "checkpoints"
        )

    @property
    def data_csv(self):
        return self.root / self.cfg.data.out / "rewrites.csv"

    @property
    def train_csv(self):
        return Path(self.cfg.train.data) if self.cfg.train.data else self.data_csv

    @property
    def adapter(self):
        return self.root / self.cfg.train.out / "adapter.lora.h5"

    @property
    def best_adapter(self):
        """The adapter of the best validation score (train.eval_rows)."""
        return self.root / self.cfg.train.out / "best.lora.h5"

    @property
    def predict_input(self):
        return Path(self.cfg.predict.input) if self.cfg.predict.input else self.data_csv

    def read_predict_rows(self, log=print):
        """The rows predict predicts (and compare scores): `predict.input`,
        or its holdout part when `predict.rows` is holdout."""
        df = read_table(
            self.predict_input,
            TEST_COLUMNS,
            ["original_text", "rewritten_text"],
            empty="keep",
            log=log,
        )
        if self.cfg.predict.rows == "holdout":
            if "rewrite_prompt" not in read_header(self.predict_input):
                # Without it the file is not a run's training CSV, whose split the
                # holdout is; most of its ids would be missing from the submission.
                raise InputError(
                    f"{self.predict_input}: predict.rows=holdout takes the holdout part of a "
                    "run's own training CSV, and this file has no 'rewrite_prompt' column; "
                    "set predict.rows=all to predict every row"
                )
            _, _, holdout = split_rows(len(df), self.cfg.split)
            df = df.iloc[list(holdout)].reset_index(drop=True)
        return df

    @property
    def predict_adapter(self):
        """The adapter path for predict, or None for the base model."""
        return self._chosen_adapter(self.cfg.predict.adapter)

    @property
    def export_adapter(self):
        """The adapter merged by the export, or None for the base model."""
        return self._chosen_adapter(self.cfg.export.adapter)

    def _chosen_adapter(self, choice):
        if choice == "none":
            return None
        if choice not in ("run", "best"):
            return Path(choice)
        chosen = self.adapter if choice == "run" else self.best_adapter
        if self.mirror and not hosts.is_main_process():
            # Process 0 pulled the run folder; each other host fetches the adapter itself.
            for path in (chosen, adapter_settings_path(chosen)):
                self.mirror.fetch(path)
        return chosen

    @property
    def transformers_model(self):
        """The merged model in Hugging Face transformers format."""
        return self.root / self.cfg.export.out / "transformers"

    @property
    def peft_adapter(self):
        """The adapter alone, in PEFT's format."""
        return self.root / self.cfg.export.out / "peft_adapter"

    @property
    def kaggle_bundle(self):
        return self.root / self.cfg.kaggle.out

    @property
    def mean_prompt_targets(self):
        targets = self.cfg.mean_prompt.targets
        return Path(targets) if targets else self.data_csv

    @property
    def mean_prompt_clusters(self):
        """Each cluster's centroid and mean prompt (`mean_prompt.clusters`)."""
        return self.root / self.cfg.mean_prompt.out / "clusters.json"

    @property
    def mean_prompt(self):
        return self.root / self.cfg.mean_prompt.out / "mean_prompt.txt"

    @property
    def raw_outputs(self):
        """The model's own outputs, before combination."""
        return self.root / self.cfg.predict.out / "model_outputs.csv"

    @property
    def outputs_by_opening(self):
        """Each forced opening's answers (predict.openings), a column each."""
        return self.root / self.cfg.predict.out / "model_outputs_by_opening.csv"

    @property
    def submission(self):
        return self.root / self.cfg.predict.out / "submission.csv"

    @property
    def predictions(self):
        return Path(self.cfg.score.predictions) if self.cfg.score.predictions else self.submission

    @property
    def truth(self):
        return Path(self.cfg.score.truth) if self.cfg.score.truth else self.predict_input

    def truth_available(self):
        """True when the true prompts of predict's rows are known: the truth
        file (score.truth, else predict's input) has a rewrite_prompt column.
        The competition's test.csv has none."""
        return "rewrite_prompt" in read_header(self.truth)

    def check_truth_available(self):
        if not self.truth_available():
            raise InputError(
                f"{self.truth} has no rewrite_prompt column (a test file: there is nothing to "
                "score "
                "against); `make evaluate` scores the adapter on the holdout rows of the training "
                "data "
                "instead, or set score.truth to a CSV with id, rewrite_prompt"
            )


def pushes_run(stage):
    """Decorates a stage function `stage(cfg, ...)`: when it ends, also by
    an error or a preemption, its run folder goes to the run's bucket."""

    @functools.wraps(stage)
    def run_and_push(cfg, *args, **kwargs):
        try:
            return stage(cfg, *args, **kwargs)
        finally:
            RunDir(cfg).push()

    return run_and_push
