"""Building the final prompt from several parts (model outputs, mean prompt).

Every leading competition entry joined a model's prediction with a "mean
prompt". Parts are joined row by row in the configured order; empty parts
are skipped, the result is cut to what the encoder sees, and a row left
empty gets the fallback (a blank prediction makes the scorer fail), and so
does one that pandas reads as missing ("NA", "None", "null", ...).

Example:
```python
rows, n_fallback = combine_parts([["Make it rhyme.", ""], ["Improve this text."] * 2],
                                 " ", "Improve the text to this.")
# (['Make it rhyme. Improve this text.', 'Improve this text.'], 0)
```
"""

import pandas as pd

from pipeline.errors import MissingInputError
from pipeline.text.tables import SUBMISSION_COLUMNS, TableError, read_table

# Cells pandas reads as missing by default, as the competition's scorer reads
# submissions: such a prediction counts as blank.
MISSING_BY_PANDAS = frozenset(
    [
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    ]
)


def combine_parts(parts, separator, fallback, cut=None):
    """Returns (combined prompts, rows that needed the fallback)."""
    combined, fallbacks = [], 0
    for row in zip(*parts, strict=False):
        text = separator.join(p.strip() for p in row if p and p.strip())
        if cut is not None:
            text = cut(text)
        if not text or text in MISSING_BY_PANDAS:
            text, fallbacks = fallback, fallbacks + 1
        combined.append(text)
    return combined, fallbacks


def load_parts(names, ids, mean_prompt_path, clusters_path=None):
    """Each part as a list aligned with `ids`: "mean_prompt", or a
    submission CSV path (another adapter's or preset's output); None stands
    for "model" and "clustered_mean_prompt" (each row's cluster's, by its
    model output), which the caller fills in once it has the outputs.
    Called before generating, so that a missing file costs no generation
    work."""
    parts = []
    for name in names:
        if name == "model":
            parts.append(None)
        elif name == "clustered_mean_prompt":
            if not clusters_path or not clusters_path.exists():
                raise MissingInputError(
                    f"{clusters_path} not found; run the mean-prompt stage with "
                    "mean_prompt.clusters=k (3rd place: 12)"
                )
            parts.append(None)
        elif name == "mean_prompt":
            if not mean_prompt_path.exists():
                raise MissingInputError(
                    f"{mean_prompt_path} not found; run the mean-prompt stage first"
                )
            parts.append([mean_prompt_path.read_text().strip()] * len(ids))
        else:
            other = read_table(name, SUBMISSION_COLUMNS, empty="keep").set_index("id")[
                "rewrite_prompt"
            ]
            missing = pd.Index(ids).difference(other.index)
            if len(missing):
                raise TableError(f"{name}: column 'id': no row for id {missing[0]!r}")
            parts.append(list(other.loc[list(ids)]))
    return parts
