"""The sweep: the grid read from overrides, one run per setting on the base
run's data, the table and plot of validation scores, nothing trained twice."""

import json

import pandas as pd
import pytest
from processes import tiny_config

from pipeline.errors import InputError
from pipeline.run.config import ConfigError, load_config, split_grid
from pipeline.workflows.sweep import grid_points, point_configs, point_name, run_sweep

SETTINGS = ["data.max_rows=48", "split.validation=0.2", "train.epochs=1", "train.eval_every=2"]


def test_overrides_listing_values_of_their_key_are_the_grid():
    plain, axes = split_grid(
        [
            "lora.rank=[2,4]",
            "train.learning_rate=[1e-4,2e-4]",
            "lora.target_layers=[query,value]",  # one value of a key that takes a list
            "train.epochs=2",
        ]
    )
    assert plain == ["lora.target_layers=[query,value]", "train.epochs=2"]
    assert axes == {"lora.rank": [2, 4], "train.learning_rate": ["1e-4", "2e-4"]}
    _, axes = split_grid(["lora.target_layers=[[query],[query,value]]"])
    assert axes == {"lora.target_layers": [["query"], ["query", "value"]]}
    with pytest.raises(ConfigError, match="lora.rank=\\[2,4\\]"):
        split_grid(["lora.rank=[]"])
    points = grid_points(axes | {"lora.rank": [2, 4]})
    assert points[1] == ['lora.target_layers=["query"]', "lora.rank=4"]
    assert len(points) == 4
    assert point_name("r", ["lora.rank=4", "train.learning_rate=0.0001"]) == (
        "r-rank=4_learning_rate=0.0001"
    )
    assert load_config(None, ["train.learning_rate=1e-4"]).train.learning_rate == 1e-4


def config(tiny, root, *overrides):
    return tiny_config(tiny, root, [*SETTINGS, *overrides])


def test_a_bad_value_in_the_grid_stops_the_sweep_before_any_work(tiny, tmp_path):
    with pytest.raises(InputError, match="lora.rank must be int"):
        run_sweep(config(tiny, tmp_path), {"lora.rank": [2, "two"]}, log=lambda *_: None)
    with pytest.raises(InputError, match="train.eval_rows is 0"):
        run_sweep(
            config(tiny, tmp_path, "train.eval_rows=0"), {"lora.rank": [2]}, log=lambda *_: None
        )
    assert not any(tmp_path.iterdir())
    configs = point_configs(config(tiny, tmp_path), {"train.learning_rate": ["1e-4", 2e-4]})
    assert [point for point, _ in configs] == [
        ["train.learning_rate=0.0001"],
        ["train.learning_rate=0.0002"],
    ]
    assert configs[0][1].run.name == "cpu_tiny-learning_rate=0.0001"
    assert configs[0][1].train.data == str(tmp_path / "cpu_tiny" / "data" / "rewrites.csv")


@pytest.mark.slow
def test_the_sweep_trains_each_setting_once_and_tables_their_validation_scores(tiny, tmp_path):
    cfg = config(tiny, tmp_path)
    logs = []
    table = run_sweep(cfg, {"lora.rank": [2, 4]}, log=logs.append)
    base = tmp_path / cfg.run.name
    written = pd.read_csv(base / "sweep" / "sweep.csv")
    assert list(written["setting"]) == list(table["setting"])
    assert sorted(written["setting"]) == ["lora.rank=2", "lora.rank=4"]
    assert written["best_validation_score"].is_monotonic_decreasing
    for row in written.itertuples():
        run = tmp_path / f"{cfg.run.name}-rank={row.setting[-1]}"
        history = json.loads((run / "finetune" / "history.json").read_text())
        assert row.best_validation_score == pytest.approx(history["best"]["score"])
        assert row.best_step == history["best"]["step"]
        adapter = json.loads((run / "finetune" / "adapter.json").read_text())
        assert adapter["rank"] == int(row.setting[-1])
        assert not (run / "data").exists()  # trained on the base run's data
    assert (base / "data" / "rewrites.csv").exists() and (base / "sweep" / "sweep.png").exists()
    rerun = []
    again = run_sweep(cfg, {"lora.rank": [2, 4]}, log=rerun.append)
    assert sum("not trained again" in line for line in rerun) == 2
    assert not any(line.startswith("finetune:") for line in rerun)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), table.reset_index(drop=True))
