"""Source texts for the data stage: reading, chunking, filtering.

As in the reference notebook, texts are cut into chunks of about
`chunk_words` words, and a chunk is dropped when it holds wiki markup
(`==`), is shorter than `min_chars` characters, or is not plain ASCII.

Example:
```python
texts = read_sources([SourceConfig("demo/texts.txt")])
chunks, dropped = chunk_texts(texts, chunk_words=256, min_chars=50)
```
"""

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from pipeline.errors import InputError, MissingInputError
from pipeline.text.tables import read_table


def read_sources(source_cfgs):
    """All texts of all sources, in order."""
    texts = []
    for source in source_cfgs:
        path = Path(source.path)
        if not path.exists():
            raise MissingInputError(f"data.sources: {path} not found")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            texts += [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        elif suffix in (".csv", ".jsonl"):
            texts += _read_column(path, source.column, suffix)
        else:
            raise InputError(f"data.sources: {path}: use a .txt, .csv or .jsonl file")
    return [t for t in texts if t]


def _read_column(path, column, suffix):
    if not column:
        raise InputError(f"data.sources: {path}: set `column` to the text column")
    if suffix == ".csv":
        df = read_table(path, [column], empty="keep")
    else:
        rows = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: line {line_no}: not valid JSON: {e.msg}") from None
        df = pd.DataFrame(rows)
    if column not in df.columns:
        raise InputError(f"{path}: no column {column!r}; it has {list(df.columns)}")
    return [str(t).strip() for t in df[column].fillna("")]


def chunk_texts(texts, chunk_words, min_chars):
    """Returns (kept chunks, Counter of drop reasons)."""
    chunks, dropped = [], Counter()
    for text in texts:
        words = text.split()
        for start in range(0, len(words), chunk_words):
            chunk = " ".join(words[start : start + chunk_words])
            reason = _drop_reason(chunk, min_chars)
            if reason:
                dropped[reason] += 1
            else:
                chunks.append(chunk)
    return chunks, dropped


def _drop_reason(chunk, min_chars):
    if "==" in chunk:
        return "wiki markup"
    if len(chunk) < min_chars:
        return "too short"
    if not chunk.isascii():
        return "non-ASCII"
    return None
