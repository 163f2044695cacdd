"""The user's Kaggle credentials, for the workers of a slice that download a gated preset.

A KerasHub preset name or a kaggle:// handle is downloaded by kagglehub on
every worker, and the models the pipeline uses (Gemma, Llama, Mistral) are
gated: without the user's credentials the data stage fails on every host,
after the slice is created and set up. `scripts/tpu_pod.py` therefore finds
them here, where kagglehub looks (in its order), before it creates
anything, and copies them to `~/.kaggle/` on every worker:

- `KAGGLE_API_TOKEN` (the token, or a file holding it), `~/.kaggle/access_token`;
- `KAGGLE_USERNAME` and `KAGGLE_KEY`, `$KAGGLE_CONFIG_DIR/kaggle.json` or
  `~/.kaggle/kaggle.json`.

Standard library only: the launcher runs on a fresh clone's python3.

Example:
```python
if downloads_from_kaggle(cfg.model.preset):
    credentials = find_credentials(os.environ, Path.home())  # None: refuse, say how
    path = credentials.write_into(private_folder)  # <folder>/kaggle.json, mode 600
```
"""

import dataclasses
import json
import os
from pathlib import Path

HOW_TO_PROVIDE = (
    "create an API token at https://www.kaggle.com/settings (Account, API) and save it as "
    "~/.kaggle/kaggle.json (or set KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN), and "
    "accept the model's license on its Kaggle page with that account; or copy the preset to a "
    "bucket and set model.preset=gs://BUCKET/PRESET"
)


@dataclasses.dataclass
class KaggleCredentials:
    file_name: str  # under ~/.kaggle/ on a worker: "access_token" or "kaggle.json"
    content: str
    source: str  # where they were found, for the log (never the secret)

    def write_into(self, folder):
        """The credentials as `folder/<file_name>`, readable by the owner only."""
        path = Path(folder) / self.file_name
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(self.content)
        return path


def downloads_from_kaggle(preset):
    """True for a kaggle:// handle and a KerasHub preset name (a bare name:
    KerasHub's presets are Kaggle models); False for a folder, gs:// or hf://."""
    preset = str(preset)
    return preset.startswith("kaggle://") or ("/" not in preset and not Path(preset).exists())


def find_credentials(environ, home):
    """The first credentials kagglehub would use, or None."""
    token = environ.get("KAGGLE_API_TOKEN")
    if token:
        value = Path(token).read_text().strip() if Path(token).is_file() else token
        return KaggleCredentials("access_token", value, "KAGGLE_API_TOKEN")
    for name in ("access_token", "access_token.txt"):
        path = Path(home) / ".kaggle" / name
        if path.is_file() and path.read_text().strip():
            return KaggleCredentials("access_token", path.read_text().strip(), str(path))
    if environ.get("KAGGLE_USERNAME") and environ.get("KAGGLE_KEY"):
        content = json.dumps({"username": environ["KAGGLE_USERNAME"], "key": environ["KAGGLE_KEY"]})
        return KaggleCredentials("kaggle.json", content, "KAGGLE_USERNAME and KAGGLE_KEY")
    folder = Path(environ.get("KAGGLE_CONFIG_DIR") or Path(home) / ".kaggle")
    if (folder / "kaggle.json").is_file():
        return KaggleCredentials(
            "kaggle.json", (folder / "kaggle.json").read_text(), str(folder / "kaggle.json")
        )
    return None
