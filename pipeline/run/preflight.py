"""Before a pod's stages start: can worker 0 reach and write what they will?

A stage that cannot load its model, reach its encoder or write its run is
otherwise found out only after the slice is paid for, set up, and every
host has started and joined the pod. `scripts/tpu_pod.py setup` runs these
checks on worker 0 first (`scripts/preflight.py`), each with the loader or
writer the stage itself uses:

- the run root and the checkpoint folder can be written
  (`RunDir.check_writable`, which every stage repeats before its model);
- the preset's config.json can be read (KerasHub's loader: for a preset
  name or a kaggle:// handle a download with the Kaggle credentials that
  `tpu_pod.py up` copied to the workers);
- the encoder's folder can be had (a TF Hub or Kaggle handle is downloaded
  into the cache where the stages find it again).

Example:
```python
check_ready(localized(cfg), log=print)  # raises InputError naming what is out of reach
```
"""

from pipeline.errors import InputError
from pipeline.run.run_dir import RunDir


def check_ready(cfg, log=print):
    from pipeline import keras_internals
    from pipeline.text.encoder import encoder_folder

    RunDir(cfg).check_writable()
    log(f"preflight: the run root {cfg.run.root} and the checkpoint folder can be written")
    reach(
        "model.preset",
        cfg.model.preset,
        keras_internals.read_preset_json,
        "a preset name or kaggle:// handle needs the workers' Kaggle credentials (`tpu_pod.py up` "
        "copies yours) and the model's license accepted on kaggle.com with that account; or copy "
        "the preset to a bucket and set model.preset=gs://BUCKET/PRESET",
    )
    log(f"preflight: model.preset {cfg.model.preset} can be read")
    reach(
        "score.encoder",
        cfg.score.encoder,
        encoder_folder,
        "give a TF Hub URL, a Kaggle Models handle, or a folder (on a bucket: gs://...)",
    )
    log(f"preflight: score.encoder {cfg.score.encoder} can be had")


def reach(key, value, load, what_to_do):
    """Raises InputError naming `key` when `load(value)` fails."""
    try:
        load(value)
    except Exception as error:  # any loader's error: the message carries it
        raise InputError(
            f"{key} {value} cannot be reached from here ({type(error).__name__}: "
            f"{str(error)[:500]}); {what_to_do}"
        ) from None
