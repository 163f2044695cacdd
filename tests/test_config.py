from pathlib import Path

import pytest
import yaml

from pipeline.run.config import ConfigError, load_config, save_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.distribution.mesh_shape[0] * cfg.distribution.mesh_shape[1] >= 1
    assert cfg.train.batch_size % cfg.distribution.mesh_shape[0] == 0


def test_kaggle_config_uses_reference_setup():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "kaggle_tpu_v3_8.yaml")
    assert cfg.model.preset == "gemma_instruct_7b_en"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.distribution.mesh_shape == [1, 8]
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.train.learning_rate) == (64, 16.0, 2e-4)


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, {"train": {"epochz": 2}})
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'train\.epochz'"):
        load_config(path)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(_write(tmp_path, {"trian": {}}))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs must be int, got str 'two'"):
        load_config(_write(tmp_path, {"train": {"epochs": "two"}}))


def test_literal_choices(tmp_path):
    with pytest.raises(ConfigError, match="model.dtype must be one of"):
        load_config(_write(tmp_path, {"model": {"dtype": "fp8"}}))


def test_list_of_sections_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required key 'data\.sources\[0\]\.path'"):
        load_config(_write(tmp_path, {"data": {"sources": [{"column": "text"}]}}))


def test_int_accepted_for_float_but_bool_not_for_int(tmp_path):
    cfg = load_config(_write(tmp_path, {"lora": {"alpha": 32}}))
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)
    with pytest.raises(ConfigError, match="lora.rank must be int"):
        load_config(_write(tmp_path, {"lora": {"rank": True}}))


def test_overrides_apply_and_are_validated(tmp_path):
    path = _write(tmp_path, {"lora": {"rank": 4}})
    cfg = load_config(path, ["lora.rank=8", "train.epochs=2", "distribution.mesh_shape=[2,4]"])
    assert (cfg.lora.rank, cfg.train.epochs, cfg.distribution.mesh_shape) == (8, 2, [2, 4])
    with pytest.raises(ConfigError, match="unknown key 'lora.rnk'"):
        load_config(path, ["lora.rnk=8"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["lora.rank"])


def test_defaults_are_the_base_config(tmp_path):
    cfg = load_config(_write(tmp_path, {}))
    assert cfg.train.learning_rate == 2e-4 and cfg.predict.max_new_tokens == 35


def test_saved_config_loads_back_identical(tmp_path):
    cfg = load_config(None, ["lora.rank=3"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")


def test_empty_config_file_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="empty.yaml: the file is empty"):
        load_config(empty)


def _leaves(raw, prefix=""):
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        else:
            yield path, value


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_hold_only_what_their_target_changes(path):
    import dataclasses

    from pipeline.run.config import Config

    base = dataclasses.asdict(Config())
    for key, value in _leaves(yaml.safe_load(path.read_text())):
        default = base
        for part in key.split("."):
            default = default[part]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            continue  # lists of sections (data.sources) have no default to repeat
        assert value != default, f"{path}: {key} repeats the default {default!r}; leave it out"
