"""Kaggle's input mounts, in either layout.

Kaggle mounts a notebook's inputs under `/kaggle/input`: now at
`competitions/<slug>/`, `datasets/<owner>/<slug>/` and
`models/<owner>/<model>/<framework>/<variation>/<version>/`, before at
`<slug>/` (and `<model>/<framework>/<variation>/<version>/`), which some
notebooks still find as aliases and others do not. A configured
`/kaggle/input/...` path that is not there is looked up in both layouts by
what follows its slug; when nothing (or more than one thing) matches, the
error lists what is mounted. `KAGGLE_INPUT_ROOT` moves the mount point
(the rehearsal mounts its inputs in a temporary folder).

Example:
```python
found_on_kaggle("/kaggle/input/llm-prompt-recovery/test.csv")
# /kaggle/input/competitions/llm-prompt-recovery/test.csv where that is mounted
```
"""

import os
from pathlib import Path, PurePosixPath

from pipeline.errors import MissingInputError

KAGGLE_INPUT = PurePosixPath("/kaggle/input")
# The new layout's first folder, and how many folders (owner) come before the slug.
LAYOUTS = {"competitions": 0, "datasets": 1, "models": 1}


class KaggleInputError(MissingInputError):
    """A /kaggle/input path found in neither layout; the message lists what is mounted."""


def input_root():
    return Path(os.environ.get("KAGGLE_INPUT_ROOT", KAGGLE_INPUT))


def found_on_kaggle(path, log=print):
    """`path` where it is mounted: itself when it exists or is not under
    /kaggle/input, else its one match in either layout (said in the log)."""
    if not path or not PurePosixPath(path).is_relative_to(KAGGLE_INPUT):
        return path
    root = input_root()
    given = root / PurePosixPath(path).relative_to(KAGGLE_INPUT)
    if given.exists():
        return str(given)
    matches = [p for p in _candidates(root, _after_layout(given.relative_to(root))) if p.exists()]
    if len(matches) != 1:
        raise KaggleInputError(
            f"{path}: not mounted, and {len(matches) or 'nothing'} "
            f"{'matches' if len(matches) > 1 else 'matching'} in either Kaggle layout"
            f"{': ' + ', '.join(map(str, matches)) if matches else ''}; {root} holds "
            f"{', '.join(_mounted(root)) or 'nothing'} (add the input to the notebook, or set "
            "the path)"
        )
    log(f"{path}: not mounted there; found at {matches[0]}")
    return str(matches[0])


def _after_layout(relative):
    """The slug and what follows it, without the new layout's folders."""
    parts = relative.parts
    if parts and parts[0] in LAYOUTS:
        return Path(*parts[1 + LAYOUTS[parts[0]] :])
    return relative


def _candidates(root, tail):
    yield root / tail
    yield root / "competitions" / tail
    for layout in ("datasets", "models"):
        yield from sorted((root / layout).glob(f"*/{tail}"))


def _mounted(root):
    """The inputs under `root`: each slug with the layout folders before it."""
    if not root.is_dir():
        return []
    found = []
    for top in sorted(root.iterdir()):
        depth = LAYOUTS.get(top.name)
        if depth is None:
            found.append(top.name)
        else:
            found += [
                str(p.relative_to(root)) for p in sorted(top.glob("/".join(["*"] * (depth + 1))))
            ]
    return found
