"""The YAML the configs are written in, read with the standard library.

The Cloud TPU launcher (scripts/tpu_pod.py) runs on whatever `python3` a
fresh clone finds, before `make install`: often one without PyYAML.
`pipeline.run.config` reads with PyYAML where it is installed and with this
reader otherwise. It reads block mappings and sequences (`- key: value`
items too), flow lists of scalars (`[4, 8]`), quoted and plain scalars and
comments, and resolves plain scalars as PyYAML does (YAML 1.1: `1e-4` is a
string, `2.0e-4` a float, `yes` a boolean). Anything else (anchors, tags,
block scalars, flow mappings) stops with a line that says to install PyYAML.
A test keeps it equal to PyYAML on every config in configs/.

Example:
```python
safe_load("distribution:\\n  mesh_shape: [4, 8]\\n")  # {'distribution': {'mesh_shape': [4, 8]}}
```
"""

import json
import re

# PyYAML's implicit resolvers (yaml/resolver.py), in its order.
BOOL = re.compile(r"yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF")
TRUE = {"yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"}
FLOAT = re.compile(
    r"[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
INT = re.compile(r"[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+")
NULL = re.compile(r"~|null|Null|NULL|")
# What PyYAML would read as something this reader does not make.
UNSUPPORTED = re.compile(
    r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?|\d{4}-\d\d?-\d\d?.*|<<|="
)


class YAMLError(ValueError):
    """Text this reader cannot read as PyYAML would."""


def safe_load(text):
    lines = [_without_comment(line) for line in text.splitlines()]
    lines = [(len(line) - len(line.lstrip(" ")), line.strip()) for line in lines if line.strip()]
    if not lines:
        return None
    value, end = _block(lines, 0, lines[0][0])
    if end != len(lines):
        raise YAMLError(f"line {end + 1}: indented less than the block above; {INSTALL}")
    return value


INSTALL = "the launcher's own reader stops here: install PyYAML (pip install pyyaml)"


def _without_comment(line):
    quote = None
    for i, char in enumerate(line):
        before = line[:i].rstrip()
        if quote == '"' and char == "\\":
            quote = "escaped"
        elif quote == "escaped":
            quote = '"'
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"" and (not before or before[-1] in ":-[,"):
            quote = char  # a quoted scalar begins (a quote inside a plain one does not)
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return before
    return line.rstrip()


def _block(lines, start, indent):
    """The mapping or sequence whose lines begin at `start` with `indent`
    spaces; returns it and the index of the first line after it."""
    if lines[start][1] == "-" or lines[start][1].startswith("- "):
        return _sequence(lines, start, indent)
    if _is_mapping(lines[start][1]):
        return _mapping(lines, start, indent)
    return _scalar(lines[start][1]), start + 1


def _is_mapping(text):
    return ": " in text or text.endswith(":")


def _sequence(lines, start, indent):
    items, i = [], start
    while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-"):
        rest = lines[i][1][1:].lstrip(" ")
        if not rest:
            value, i = _nested(lines, i + 1, indent)
        elif _is_mapping(rest):
            # `- key: value`: a mapping whose keys sit where `key` does.
            inner = indent + len(lines[i][1]) - len(rest)
            value, i = _block([*lines[:i], (inner, rest), *lines[i + 1 :]], i, inner)
        else:
            value, i = _scalar(rest), i + 1
        items.append(value)
    return items, i


def _mapping(lines, start, indent):
    mapping, i = {}, start
    while i < len(lines) and lines[i][0] == indent:
        key, sep, rest = lines[i][1].partition(":")
        if not sep or (rest and not rest.startswith(" ")):
            raise YAMLError(f"{lines[i][1]!r}: expected `key: value`; {INSTALL}")
        if rest.strip():
            mapping[_scalar(key.strip())], i = _scalar(rest.strip()), i + 1
        else:
            mapping[_scalar(key.strip())], i = _nested(lines, i + 1, indent)
    if i < len(lines) and lines[i][0] > indent:
        raise YAMLError(f"{lines[i][1]!r}: indented more than its mapping; {INSTALL}")
    return mapping, i


def _nested(lines, start, indent):
    """The block under a `key:` or `-` line: deeper lines, a sequence at the
    same indent under a key, or nothing (null)."""
    if start < len(lines) and lines[start][0] > indent:
        return _block(lines, start, lines[start][0])
    if start < len(lines) and lines[start][0] == indent and lines[start][1].startswith("- "):
        return _sequence(lines, start, indent)
    return None, start


def _scalar(text):
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_scalar(part.strip()) for part in inner.split(",")] if inner else []
    if text.startswith('"') and text.endswith('"') and len(text) > 1:
        try:
            return json.loads(text)
        except ValueError:
            raise YAMLError(f"{text}: an escape JSON does not know; {INSTALL}") from None
    if text.startswith("'") and text.endswith("'") and len(text) > 1:
        return text[1:-1].replace("''", "'")
    if text[:1] in "&*!|>{%@`" or UNSUPPORTED.fullmatch(text):
        raise YAMLError(f"{text!r}: not a plain value; {INSTALL}")
    return _resolved(text)


def _resolved(text):
    if BOOL.fullmatch(text):
        return text in TRUE
    if INT.fullmatch(text):
        return _int(text.replace("_", ""))
    if FLOAT.fullmatch(text):
        return _float(text.replace("_", ""))
    if NULL.fullmatch(text):
        return None
    return text


def _int(text):
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    for prefix, base in (("0b", 2), ("0x", 16)):
        if digits.startswith(prefix):
            return sign * int(digits[2:], base)
    if digits != "0" and digits.startswith("0"):
        return sign * int(digits, 8)
    return sign * int(digits)


def _float(text):
    lowered = text.lower()
    if lowered.endswith((".inf", ".nan")):
        return float(lowered.replace(".", ""))
    return float(text)
