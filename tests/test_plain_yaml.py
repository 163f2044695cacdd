"""The launcher's stdlib YAML reader gives what PyYAML gives, on every
config and on the values `key=value` overrides take, and refuses the rest."""

import pytest
import yaml
from processes import ROOT

from pipeline.run import plain_yaml

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
VALUES = [
    *["8", "-3", "+5", "0", "010", "09", "0x1F", "0b101", "1_000", "-0"],
    *["2.0e-4", "1e-4", "3.", ".5", ".inf", "-.inf", ".nan"],
    *["yes", "off", "True", "false", "null", "~", ""],
    *["gs://bucket/run", "abc:def", "'quoted # not a comment'", '"a \\"b\\""', "Don't # x"],
    *["[4, 8]", "[]", "[a, 'b c', 3, 2.5]", "a: b"],
]
DOCUMENT = """\
# a comment
run:
  name: x   # after a value
  note: 'it''s'
data:
  sources:
    - path: data/a.csv
      column: text
    - path: data/b.csv
  list:
  - one
  - 2
empty:
"""


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_reads_as_pyyaml_reads_it(path):
    text = path.read_text()
    assert plain_yaml.safe_load(text) == yaml.safe_load(text)


def test_override_values_and_block_forms_read_as_pyyaml_reads_them():
    for value in [*VALUES, DOCUMENT]:
        expected, got = yaml.safe_load(value), plain_yaml.safe_load(value)
        assert repr(got) == repr(expected), value  # repr: nan == nan, 1 != True


@pytest.mark.parametrize(
    "text",
    ["a: &anchor 1", "a: !!str 1", "a: |\n  block", "a: {b: 1}", "a: 2001-12-14", "a: 1:30"],
)
def test_what_it_does_not_read_as_pyyaml_does_is_refused(text):
    with pytest.raises(plain_yaml.YAMLError, match="install PyYAML"):
        plain_yaml.safe_load(text)


def test_the_configs_compared_are_found():  # an empty glob would compare nothing
    assert {p.name for p in CONFIGS} >= {"cpu_tiny.yaml", "cloud_tpu_v3_32.yaml"}
