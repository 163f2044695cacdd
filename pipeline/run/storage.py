"""Runs and inputs on a bucket: `gs://` paths through one file layer.

Any path key of the config may be a bucket URL (`gs://BUCKET/...`): the run
root, the inputs (sources, prompts, CSVs, adapters, preset and encoder
folders) and the checkpoint folder. The stages themselves work on local
files, because what they hand files to wants local ones (pandas' CSVs,
h5py's adapter, matplotlib, TensorBoard, KerasHub's and TF Hub's loaders):

- a run whose `run.root` is a bucket works in a local mirror of its run
  folder (under `run.mirrors`), which process 0 pulls from the bucket before each
  stage and pushes back after it (`RunMirror`); what a stage must not lose
  to a preemption goes up as it is written: each finished batch of the data
  stage is an object of its own, and finetune's checkpoints go to the
  bucket directly (Orbax);
- an input on a bucket is downloaded once into a mirror of its own under
  `run.mirrors` (`localize`) and read from there.

Objects are compared by size and MD5 before they are copied, so a pull or
push moves only what changed. An object appears whole or not at all, so
every push of a file is atomic.

Every transfer goes through fsspec's `gcsfs` (Google's credentials on a TPU
VM; `STORAGE_EMULATOR_HOST` points it at an emulator).

Example:
```python
mirror = RunMirror("gs://bucket/runs/demo", mirror_path("gs://bucket/runs/demo", "runs/.bucket"))
mirror.pull(skip=["finetune/checkpoints"])
mirror.push()  # what the stage wrote
```
"""

import base64
import hashlib
import os
import secrets
from pathlib import Path

from pipeline.errors import InputError, MissingInputError
from pipeline.text.kaggle_paths import KaggleInputError, found_on_kaggle

SCHEME = "gs://"


def is_bucket(path):
    return str(path).startswith(SCHEME)


def mirror_path(url, mirrors):
    """The local path under `mirrors` (`run.mirrors`) that mirrors a bucket URL."""
    return Path(mirrors) / str(url).removeprefix(SCHEME).strip("/")


def _filesystem():
    import fsspec

    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()  # other processes (the other hosts, a rerun) write there too
    return fs


def _local_md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return base64.b64encode(digest.digest()).decode()


def _same(local, info):
    """True when the local file holds the object `info` describes."""
    return (
        local.is_file()
        and local.stat().st_size == int(info["size"])
        and (not info.get("md5Hash") or _local_md5(local) == info["md5Hash"])
    )


def _objects(fs, url):
    """key relative to `url` -> the object's info, for every object under it
    ("" -> its info when `url` names one object)."""
    prefix = url.removeprefix(SCHEME).rstrip("/")
    return {
        key[len(prefix) :].lstrip("/"): info
        for key, info in fs.find(url, detail=True).items()
        if info.get("type") != "directory"
    }


def _copy_down(fs, url, local, skip=()):
    """Copies down every object under `url` (or the object) that `local`
    lacks or holds otherwise, but those under the `skip` folders; returns
    how many objects there are."""
    objects = _objects(fs, url)
    for key, info in objects.items():
        if any(key.startswith(folder.rstrip("/") + "/") for folder in skip):
            continue
        target = local / key if key else local
        if not _same(target, info):
            target.parent.mkdir(parents=True, exist_ok=True)
            # Beside, then renamed: a reader (another host of a pod sharing the
            # folder) sees all or nothing.
            part = target.with_name(f"{target.name}.part-{os.getpid()}")
            fs.get_file(f"{url}/{key}" if key else url, str(part))
            os.replace(part, target)
    return len(objects)


def exists(url):
    """True when the bucket holds the object `url`."""
    return _filesystem().exists(url)


def check_writable(path, key):
    """Raises InputError naming `key` unless a file can be written to (and
    deleted from) `path`: on a bucket by gcsfs, which writes the run's files
    there; a local folder in the nearest one that exists (nothing is made)."""
    probe = f".write-probe-{secrets.token_hex(4)}"
    try:
        if is_bucket(path):
            fs, url = _filesystem(), f"{str(path).rstrip('/')}/{probe}"
            fs.pipe_file(url, b"probe")
            fs.rm_file(url)
        else:
            folder = next(
                p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.exists()
            )
            (folder / probe).write_bytes(b"probe")
            (folder / probe).unlink()
    except Exception as error:  # any client error: the message says what it was
        raise InputError(
            f"{key} {path}: cannot write there ({type(error).__name__}: {error}); check the "
            "path (a bucket's name), that it exists, and that this machine's account may write "
            "to it"
        ) from None


def localize(url, mirrors):
    """The local path of `url`: itself when it is local, else a copy of the
    object, or of every object under the prefix (a preset or encoder
    folder), under `mirrors`, fetched when missing or changed."""
    if not is_bucket(url):
        return url
    local = mirror_path(url, mirrors)
    if not _copy_down(_filesystem(), str(url).rstrip("/"), local):
        raise MissingInputError(f"{url}: no such object or folder in the bucket")
    return str(local)


class RunMirror:
    """A run folder on a bucket (`remote`) and its local copy (`local`)."""

    def __init__(self, remote, local):
        self.remote = str(remote).rstrip("/")
        self.local = Path(local)

    def pull(self, skip=()):
        """Copies down every object of the run that the local copy lacks or
        holds otherwise, except those under the `skip` folders."""
        _copy_down(_filesystem(), self.remote, self.local, skip)

    def fetch(self, path):
        """Copies down one file of the run (`path`, in the local copy) when
        the local copy lacks it or holds it otherwise."""
        relative = Path(path).relative_to(self.local).as_posix()
        _copy_down(_filesystem(), f"{self.remote}/{relative}", Path(path))

    def push(self, path=None):
        """Copies up the files of the local copy (or of `path`, a file or
        folder in it) that the bucket lacks or holds otherwise."""
        top = Path(path) if path else self.local
        if not top.exists():
            return
        fs = _filesystem()
        relative = top.relative_to(self.local).as_posix()
        base = self.remote if relative == "." else f"{self.remote}/{relative}"
        remote = _objects(fs, base)
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for file in files:
            key = "" if file == top else file.relative_to(top).as_posix()
            if key not in remote or not _same(file, remote[key]):
                fs.put_file(str(file), f"{base}/{key}" if key else base)


def adapter_settings_path(path):
    """The settings file beside an adapter (`x.lora.h5` -> `x.json`); a
    bucket URL stays a string."""
    beside = str(path).removesuffix(".lora.h5") + ".json"
    return beside if is_bucket(path) else Path(beside)


def localized(cfg, log=print):
    """`cfg` with each gs:// input replaced by its local copy (fetched into
    `run.mirrors` when missing or changed) and each /kaggle/input path by
    where Kaggle mounted it (`found_on_kaggle`): source texts, prompt pool,
    CSVs, adapters (with their settings file), the preset, the encoder and
    its SentencePiece model. A /kaggle/input path mounted nowhere stays as
    it is, with a note of what is mounted: a stage that does not read it
    (predict, without the source texts attached) goes on."""
    import dataclasses

    def local(path):
        try:
            return localize(found_on_kaggle(path), cfg.run.mirrors) if path else path
        except KaggleInputError as error:
            log(f"note: {error}; a stage that reads it stops there")
            return path

    def adapter(choice):
        if choice in ("run", "none") or not is_bucket(choice):
            return choice
        local(adapter_settings_path(choice))
        return local(choice)

    def combine_part(part):
        return part if part in ("model", "mean_prompt") else local(part)

    replace = dataclasses.replace
    return replace(
        cfg,
        model=replace(cfg.model, preset=local(cfg.model.preset)),
        data=replace(
            cfg.data,
            prompts=local(cfg.data.prompts),
            sources=[replace(source, path=local(source.path)) for source in cfg.data.sources],
        ),
        train=replace(cfg.train, data=local(cfg.train.data)),
        mean_prompt=replace(
            cfg.mean_prompt,
            targets=local(cfg.mean_prompt.targets),
            piece_model=local(cfg.mean_prompt.piece_model),
        ),
        predict=replace(
            cfg.predict,
            input=local(cfg.predict.input),
            adapter=adapter(cfg.predict.adapter),
            combine=[combine_part(part) for part in cfg.predict.combine],
        ),
        score=replace(
            cfg.score,
            encoder=local(cfg.score.encoder),
            predictions=local(cfg.score.predictions),
            truth=local(cfg.score.truth),
        ),
        export=replace(cfg.export, adapter=adapter(cfg.export.adapter)),
    )
