"""Runs and inputs on a bucket (the tests' GCS emulator): the run folder's
mirror, inputs fetched from gs://, and the data stage resuming from what
the bucket alone holds."""

import shutil

import pandas as pd
import pytest
from etils import epath
from processes import tiny_config

from pipeline.errors import InputError, MissingInputError
from pipeline.run.config import load_config
from pipeline.run.run_dir import RunDir
from pipeline.run.storage import RunMirror, localize, localized, mirror_path
from pipeline.stages.data import run_data_stage


def objects(url):
    """The keys under `url`, relative to it (gcsfs, as the pipeline lists them)."""
    import fsspec

    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    prefix = url.removeprefix("gs://") + "/"
    return sorted(key.removeprefix(prefix) for key in fs.find(url))


@pytest.mark.parametrize(
    "overrides, said",
    [
        # tensorstore refuses a bucket name that gcsfs accepts
        (["train.checkpoint_dir=gs://ab/checkpoints"], "Invalid GCS bucket name"),
        (["train.checkpoint_dir=gs://no-such-bucket/checkpoints"], "NOT_FOUND"),
        (["run.root=gs://no-such-bucket/runs"], "run.root gs://no-such-bucket/runs: cannot write"),
    ],
)
def test_a_run_that_cannot_be_written_stops_the_data_stage_before_it_loads_the_model(
    tiny_cfg, gcs_bucket, tmp_path, monkeypatch, overrides, said
):
    import pipeline.models.model

    def load_model(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline.models.model, "load_model", load_model)
    epath.Path(f"{gcs_bucket}/runs/cpu_tiny/finetune/checkpoints/1/meta").write_text("{}")
    cfg = load_config(
        None,
        [
            f"run.root={gcs_bucket}/runs",
            f"run.mirrors={tmp_path / 'mirrors'}",
            f"model.preset={tiny_cfg.model.preset}",
            *overrides,
        ],
    )
    with pytest.raises(InputError, match=said):
        run_data_stage(cfg, log=lambda *_: None)
    # Not a probe left, nothing of the stage, and what was there is still there.
    assert objects(gcs_bucket) == ["runs/cpu_tiny/finetune/checkpoints/1/meta"]


def test_the_write_checks_leave_the_bucket_as_they_found_it(gcs_bucket, tmp_path):
    checkpoint = f"{gcs_bucket}/runs/cpu_tiny/finetune/checkpoints/1/meta"
    epath.Path(checkpoint).write_text("{}")
    run = RunDir(load_config(None, [f"run.root={gcs_bucket}/runs", f"run.mirrors={tmp_path}"]))
    run.check_writable()  # gcsfs in runs/, tensorstore in the checkpoint folder
    assert objects(gcs_bucket) == [checkpoint.removeprefix(f"{gcs_bucket}/")]


def test_a_local_run_root_that_cannot_be_written_is_named(tiny_cfg, tmp_path):
    (tmp_path / "a-file").write_text("")
    tiny_cfg.run.root = str(tmp_path / "a-file" / "runs")
    with pytest.raises(InputError, match=r"run.root .*a-file/runs: cannot write there"):
        run_data_stage(tiny_cfg, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_push_and_pull_copy_what_changed_and_leave_out_the_skipped_folders(gcs_bucket, tmp_path):
    local = tmp_path / "run"
    (local / "data").mkdir(parents=True)
    (local / "data" / "rewrites.csv").write_text("id\nr1\n")
    (local / "finetune" / "checkpoints" / "3").mkdir(parents=True)
    (local / "finetune" / "checkpoints" / "3" / "state").write_bytes(b"\0" * 10)
    mirror = RunMirror(f"{gcs_bucket}/runs/x", local)
    mirror.push()
    assert objects(f"{gcs_bucket}/runs/x") == ["data/rewrites.csv", "finetune/checkpoints/3/state"]
    (local / "data" / "rewrites.csv").write_text("id\nr2\n")  # same size, other bytes
    mirror.push(local / "data")
    assert epath.Path(f"{gcs_bucket}/runs/x/data/rewrites.csv").read_text() == "id\nr2\n"

    fresh = RunMirror(f"{gcs_bucket}/runs/x", tmp_path / "elsewhere")
    fresh.pull(skip=["finetune/checkpoints"])
    assert (fresh.local / "data" / "rewrites.csv").read_text() == "id\nr2\n"
    assert not (fresh.local / "finetune").exists()


def test_inputs_on_a_bucket_are_fetched_once_into_the_mirrors(gcs_bucket, tmp_path):
    epath.Path(f"{gcs_bucket}/inputs/prompts.txt").write_text("Make it rhyme.\n")
    epath.Path(f"{gcs_bucket}/inputs/preset/config.json").write_text("{}")
    epath.Path(f"{gcs_bucket}/inputs/preset/assets/tokenizer.model").write_bytes(b"spm")
    mirrors = tmp_path / "mirrors"
    assert localize("prompts/rewrite_prompts.txt", mirrors) == "prompts/rewrite_prompts.txt"
    prompts = localize(f"{gcs_bucket}/inputs/prompts.txt", mirrors)
    assert open(prompts).read() == "Make it rhyme.\n"
    preset = localize(f"{gcs_bucket}/inputs/preset", mirrors)
    assert preset == str(mirror_path(f"{gcs_bucket}/inputs/preset", mirrors))
    assert open(f"{preset}/assets/tokenizer.model", "rb").read() == b"spm"
    with pytest.raises(
        MissingInputError, match="inputs/nothing: no such object or folder in the bucket"
    ):
        localize(f"{gcs_bucket}/inputs/nothing", mirrors)

    cfg = localized(
        load_config(
            None,
            [
                f"run.mirrors={mirrors}",
                f"data.prompts={gcs_bucket}/inputs/prompts.txt",
                f"model.preset={gcs_bucket}/inputs/preset",
                "predict.adapter=none",
            ],
        )
    )
    assert (cfg.data.prompts, cfg.model.preset, cfg.predict.adapter) == (prompts, preset, "none")
    assert cfg.score.encoder == load_config(None).score.encoder  # not on a bucket: left as it is


def test_a_data_stage_on_a_bucket_resumes_from_the_bucket_alone(tiny_cfg, gcs_bucket, tmp_path):
    mirrors = tmp_path / "mirrors"
    tiny_cfg.run.root, tiny_cfg.run.mirrors, tiny_cfg.data.max_rows = (
        f"{gcs_bucket}/runs",
        str(mirrors),
        40,
    )
    csv_path = run_data_stage(tiny_cfg, log=lambda *_: None)
    expected = csv_path.read_bytes()
    run = f"{gcs_bucket}/runs/{tiny_cfg.run.name}"
    batches = [name for name in objects(run) if name.startswith("data/rewrites.partial/")]
    assert len(batches) == 40 // tiny_cfg.data.batch_size  # an object per finished batch
    assert (
        epath.Path(f"{run}/data/rewrites.csv").read_bytes() == expected
    )  # pushed when the stage ended
    # A preempted slice: the local disk gone, the stage cut short after 2 batches.
    shutil.rmtree(mirrors)
    epath.Path(f"{run}/data/rewrites.csv").unlink()
    for name in batches[2:]:
        epath.Path(f"{run}/{name}").unlink()
    logs = []
    assert run_data_stage(tiny_cfg, log=logs.append).read_bytes() == expected
    assert f"{2 * tiny_cfg.data.batch_size} already written" in " ".join(logs)
    assert epath.Path(f"{run}/data/rewrites.csv").read_bytes() == expected
    assert pd.read_csv(csv_path)["id"].is_unique


@pytest.mark.slow
def test_the_demo_on_a_bucket_scores_what_it_scores_locally(tiny, gcs_bucket, tmp_path):
    """Every stage of the demo (cut to a few rows and steps) with run.root on
    the bucket, checkpoints included, from an empty mirror: the outputs and
    the scores of the same run on a local disk."""
    from pipeline.workflows.demo import run_demo

    few = [
        "data.max_rows=40",
        "train.epochs=2",
        "train.eval_every=4",
        "train.checkpoint_every=4",
        "mean_prompt.steps=2",
        "mean_prompt.beam_width=4",
    ]
    local_cfg = tiny_config(tiny, tmp_path / "local", few)
    on_bucket = tiny_config(
        tiny, f"{gcs_bucket}/runs", [*few, f"run.mirrors={tmp_path / 'mirrors'}"]
    )
    scores = run_demo(local_cfg, log=lambda *_: None)
    assert run_demo(on_bucket, log=lambda *_: None) == scores
    run = f"{gcs_bucket}/runs/{local_cfg.run.name}"
    assert [p.name for p in epath.Path(f"{run}/finetune/checkpoints").iterdir() if p.name.isdigit()]
    local = f"{local_cfg.run.root}/{local_cfg.run.name}"
    for name in (
        "data/rewrites.csv",
        "predict/submission.csv",
        "score/score.json",
        "mean_prompt/mean_prompt.txt",
        "compare/compare.json",
    ):
        assert epath.Path(f"{run}/{name}").exists(), name
    for name in ("data/rewrites.csv", "predict/submission.csv", "mean_prompt/mean_prompt.txt"):
        assert epath.Path(f"{run}/{name}").read_bytes() == open(f"{local}/{name}", "rb").read(), (
            name
        )


def test_an_adapter_on_a_bucket_is_fetched_with_its_settings(gcs_bucket, tmp_path):
    """predict and export read the adapter's format from the .json beside it."""
    epath.Path(f"{gcs_bucket}/adapters/a.lora.h5").write_bytes(b"h5")
    epath.Path(f"{gcs_bucket}/adapters/a.json").write_text('{"rank": 4}')
    adapter = f"{gcs_bucket}/adapters/a.lora.h5"
    cfg = localized(
        load_config(
            None,
            [f"run.mirrors={tmp_path}", f"predict.adapter={adapter}", f"export.adapter={adapter}"],
        )
    )
    for local in (cfg.predict.adapter, cfg.export.adapter):
        assert open(local, "rb").read() == b"h5"
        assert open(local.removesuffix(".lora.h5") + ".json").read() == '{"rank": 4}'


def test_a_bucket_runs_checkpoints_stay_on_the_bucket(tmp_path):
    """Orbax writes them there itself, so that a preempted slice loses none;
    the stages' mirror leaves them out."""
    on_bucket = RunDir(load_config(None, ["run.root=gs://b/runs", f"run.mirrors={tmp_path}"]))
    assert on_bucket.checkpoints == "gs://b/runs/cpu_tiny/finetune/checkpoints"
    assert str(on_bucket.root).startswith(str(tmp_path))
    local = RunDir(load_config(None, [f"run.root={tmp_path}"]))
    assert local.checkpoints == tmp_path / "cpu_tiny" / "finetune" / "checkpoints"
