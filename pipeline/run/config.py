"""Typed run configuration: YAML files validated into dataclasses.

The dataclass defaults are the base config (the reference notebooks'
hyperparameters for Gemma 7B on a TPU v3-8); a YAML file in `configs/` holds
only what its target machine changes, and `key=value` overrides change one
field more. Unknown keys and wrong types raise `ConfigError` naming the key
and the file.

Example:
```python
cfg = load_config("configs/cpu_tiny.yaml", ["lora.rank=8", "train.epochs=2"])
cfg.lora.rank  # 8
save_config(cfg, "runs/demo/finetune/config.yaml")
```

This module imports neither JAX nor Keras: scripts read the config before
the environment (device count, backend) is set up.
"""

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Literal

try:
    import yaml
except ModuleNotFoundError:  # the launcher on a bare python3, before `make install`
    from pipeline.run import plain_yaml as yaml

from pipeline.errors import InputError
from pipeline.text import templates

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cpu_tiny.yaml"


class ConfigError(InputError):
    """A config file or override names an unknown key or holds a bad value."""


@dataclasses.dataclass
class RunConfig:
    root: str = "runs"  # every run writes under <root>/<name>/; a gs:// bucket path too
    name: str = "default"  # the run's folder under root
    # Local copies of a bucket's run folder and of gs:// inputs
    # (pipeline/run/storage.py).
    mirrors: str = "runs/.bucket"
    # The most a run may write under root (a target's limit, e.g. Kaggle's
    # 20 GB working folder), checked by finetune before it trains; unset: the
    # free space alone is checked.
    disk_limit_gib: float | None = None
    # The folder that limit caps, when what is already there counts too
    # (Kaggle's /kaggle/working: the clone, its .venv, earlier runs); unset:
    # only what the run writes is counted.
    disk_limit_folder: str | None = None
    # XLA's compiled programs, kept between runs (JAX's persistent compilation
    # cache), so that a rerun or a resumed stage does not compile again;
    # null turns it off. JAX_COMPILATION_CACHE_DIR in the environment wins.
    compilation_cache: str | None = "artifacts/compilation_cache"


@dataclasses.dataclass
class ModelConfig:
    # A KerasHub preset name, a kaggle:// handle, or a local preset directory.
    preset: str = "gemma_instruct_7b_en"
    dtype: Literal["float32", "bfloat16", "float16"] = (
        "bfloat16"  # the weights' and activations' dtype
    )


@dataclasses.dataclass
class DistributionConfig:
    mesh_shape: list[int] = dataclasses.field(
        default_factory=lambda: [1, 8]
    )  # the device mesh (data, model); a model axis of 1 is data parallelism
    axis_names: list[str] = dataclasses.field(
        default_factory=lambda: ["batch", "model"]
    )  # the mesh axes' names, as the layout maps use them
    # > 0: run on that many virtual CPU devices (XLA_FLAGS), e.g. 8 to
    # reproduce the TPU v3-8 mesh on a laptop.
    host_device_count: int = 0
    # Multi-host TPU slices: calls keras.distribution.initialize(). On Cloud
    # TPU the three fields below are inferred; set them to run elsewhere.
    multi_host: bool = False
    coordinator_address: str | None = None  # host:port of process 0 (multi_host only)
    num_processes: int | None = None  # how many hosts (multi_host only)
    process_id: int | None = None  # this host's index (multi_host only)
    # How long a process that has finished waits for the others at exit
    # (JAX's shutdown barrier; work that process 0 does alone is waited for
    # elsewhere, see pipeline/parallel/hosts.py).
    shutdown_timeout_seconds: int = 300


@dataclasses.dataclass
class HardwareConfig:
    """Facts about one device of the target machine (not choices)."""

    # bf16 peak, for the MFU estimate in the training log (TPU v3 core:
    # 61.5; 0 leaves MFU out).
    peak_tflops_per_device: float = 61.5
    # Memory, for the memory plan (TPU v3 core: 16 GiB).
    device_memory_gib: float = 16.0
    # GPUs: the share of device memory JAX takes at start-up (set as
    # XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's own default is 0.75). Unset on
    # TPUs and CPUs, which JAX does not preallocate.
    memory_fraction: float | None = None


@dataclasses.dataclass
class SourceConfig:
    path: str  # .txt (blank-line separated), .csv or .jsonl
    column: str | None = None  # text column for .csv / .jsonl


@dataclasses.dataclass
class DataConfig:
    sources: list[SourceConfig] = dataclasses.field(
        default_factory=list
    )  # list of {path, column}: the source texts to rewrite
    prompts: str = "prompts/rewrite_prompts.txt"  # the prompt pool, one per line
    chunk_words: int = 256  # source texts are cut into chunks of this many words
    min_chars: int = 50  # shorter chunks are dropped
    max_rows: int = 5000  # at most this many rewrite rows
    prompts_per_chunk: int = 1  # prompts drawn for each chunk
    seed: int = 0  # draws the prompts and orders the rows
    # "model": the instruct model rewrites (the reference method);
    # "rules": deterministic rule-based rewrites (the offline demo).
    rewriter: Literal["model", "rules"] = "model"
    template: str = (
        templates.REWRITE_TEMPLATE
    )  # the rewrite request, with {rewrite_prompt} and {original_text}
    # true: the request is one user turn in the model family's chat format
    # and a rewrite stops at its end of turn (Gemma's <end_of_turn>) or the
    # end token; false: the reference's bare template, stopping at the end
    # token (<eos>) only.
    chat_format: bool = True
    batch_size: int = 8  # rewrite rows generated together (global, all hosts)
    max_new_tokens: int = 256  # the most tokens a rewrite may have
    out: str = "data"  # the stage's folder in the run


@dataclasses.dataclass
class LoraConfig:
    rank: int = 64  # the LoRA rank (Keras' LoRA: per head on the attention kernels)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    # The layers LoRA adapts, by Keras layer name; null: the model family's
    # seven projections (query, key, value, attention output, and the
    # feed-forward's three: Gemma's ffw_gating, ffw_gating_2, ffw_linear;
    # Mistral's, Llama 3's and Qwen 3's feedforward_gate_dense,
    # feedforward_intermediate_dense, feedforward_output_dense).
    target_layers: list[str] | None = None


@dataclasses.dataclass
class SplitConfig:
    # Contiguous fractions of the data CSV, in this order: train, validation,
    # holdout (the reference used rows 0-4200 / 4200-4400 / 4400-5000).
    validation: float = 0.04
    holdout: float = 0.12  # see validation


@dataclasses.dataclass
class TrainConfig:
    data: str | None = None  # defaults to this run's data stage output
    template: str = (
        templates.RECOVERY_TEMPLATE
    )  # the recovery prompt, with {original_text} and {rewritten_text}
    # Few-shot: this many training rows (drawn with seed, left out of
    # training) as worked examples before every prompt; the adapter keeps
    # the resulting template, so predict and the bundle show the same.
    shots: int = 0
    sequence_length: int = 512  # tokens per example, prompt and answer
    # Room kept for the answer (prompt tokens + <eos>); the texts are cut to
    # fit the rest. Predict builds its prompts with the same budget.
    max_response_tokens: int = 64
    # Pad each batch to the next multiple of this many tokens, batching rows
    # of similar length together (0: pad every row to sequence_length).
    length_step: int = 64
    batch_size: int = 2  # rows per step (global, all hosts)
    epochs: int = 1  # passes over the training rows
    learning_rate: float = 2e-4  # AdamW's learning rate (the peak, with a schedule)
    # Over the optimizer updates: constant, or linear or cosine decay to 0 at
    # the last update; after warmup_steps updates of linear warm-up from 0.
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0  # optimizer updates of linear warm-up (any schedule)
    # Batches whose gradients are averaged into one optimizer update: the
    # effective batch is batch_size x gradient_accumulation rows.
    gradient_accumulation: int = 1
    weight_decay: float = 0.01  # AdamW's, not on biases and scales
    # Validation by the competition's metric: the first eval_rows validation
    # rows are generated (greedy, predict.max_new_tokens at most) and scored
    # with score.encoder at every epoch's end and every eval_every steps (0:
    # epoch ends only); the best-scoring adapter is kept as best.lora.h5
    # (predict.adapter: best). 0 rows: no evaluation.
    eval_rows: int = 64
    eval_every: int = 0  # see eval_rows
    early_stop: int = 0  # stop after this many evaluations without a gain (0: never)
    seed: int = 0  # the batch plan and the LoRA factors' initial values
    # Save a checkpoint every this many steps (and at every epoch end; 0:
    # epoch ends only). A rerun resumes from the last one.
    checkpoint_every: int = 200
    keep_checkpoints: int = 2  # the newest ones kept (Orbax's max_to_keep)
    # Where checkpoints go (default: <run>/finetune/checkpoints). On a pod
    # every host writes its own shards there: a bucket (gs://...) or a
    # folder every worker mounts.
    checkpoint_dir: str | None = None
    out: str = "finetune"  # the stage's folder in the run


@dataclasses.dataclass
class MeanPromptConfig:
    # Target prompts: the rewrite_prompt column of this CSV (default: this
    # run's data CSV); the search uses its training rows, and reports the
    # holdout rows' score beside.
    targets: str | None = None
    # "words": words of the target prompts; "pieces": the encoder's own
    # SentencePiece pieces (how the `lucrarea` effect was found).
    vocabulary: Literal["words", "pieces"] = "words"
    letters_only: bool = True  # vocabulary items of letters only
    top_fraction: float = 0.2  # keep the best words by single-word score
    beam_width: int = 100  # beams kept at each step (3rd place: 100)
    steps: int = 50  # the most search steps (3rd place: 50)
    moves: Literal["append", "edit"] = "append"  # edit: also insert and replace
    # The encoder's SentencePiece model, to count tokens (and list pieces);
    # default: the *.model file in the encoder's assets/ folder.
    piece_model: str | None = None
    max_tokens: int = 128  # sentence-t5 sees no more
    batch_size: int = 512  # strings embedded together
    # What the search scores: "standalone", the string alone against the
    # targets; "combined" (2nd place), the string appended to the model's
    # outputs (predict.separator, cut as predict cuts), the score of what
    # predict writes with combine [model, mean_prompt].
    objective: Literal["standalone", "combined"] = "standalone"
    # combined: the model's outputs for rows of the targets CSV (a predict
    # stage's model_outputs.csv, e.g. predict.rows=all); the first
    # combined_rows training rows among them are searched on, the holdout
    # rows among them reported.
    outputs: str | None = None
    combined_rows: int = 256  # see outputs
    # Clustered mean prompts (3rd place: 12): k-means of the training
    # targets' embeddings, one search per cluster (clusters.json), beside
    # the global one; predict's "clustered_mean_prompt" part (and compare)
    # give each row the mean prompt of the cluster nearest its model output.
    # 0: the global mean prompt only.
    clusters: int = 0
    seed: int = 0  # the k-means starts
    out: str = "mean_prompt"  # the stage's folder in the run


@dataclasses.dataclass
class PredictConfig:
    input: str | None = None  # defaults to this run's data stage output
    rows: Literal["all", "holdout"] = "all"  # all, or holdout: the split's last part
    # "run": this run's fine-tuned adapter (the last step's); "best": its
    # best by the validation score (train.eval_rows); "none": the base
    # model; or a path to a .lora.h5 file.
    adapter: str = "run"
    batch_size: int = 8  # rows generated together (global, all hosts)
    max_new_tokens: int = 35  # the most tokens of a recovered prompt
    fallback: str = "Improve the text to this."  # written where the model gives nothing
    # The final prompt, joined from parts in this order: "model" (this
    # model's output), "mean_prompt" (the run's mean prompt),
    # "clustered_mean_prompt" (its cluster's, by the model output; see
    # mean_prompt.clusters) or the path of another submission CSV (e.g.
    # another adapter's). Empty parts are
    # skipped; the result is cut to the encoder's token limit.
    combine: list[str] = dataclasses.field(default_factory=lambda: ["model"])
    separator: str = " "  # joins the parts of combine
    # Forced openings (1st place: "Rewrite", "Make this text", ...): one
    # generation per opening, each answer made to begin with it, joined by
    # the separator in this order as the "model" part. Empty: one free one.
    openings: list[str] = dataclasses.field(default_factory=list)
    out: str = "predict"  # the stage's folder in the run


@dataclasses.dataclass
class ScoreConfig:
    # A TF Hub URL, a Kaggle Models handle, or a local SavedModel directory.
    encoder: str = "https://tfhub.dev/google/sentence-t5/st5-base/1"
    predictions: str | None = None  # defaults to this run's submission.csv
    truth: str | None = None  # defaults to the predict stage's input
    batch_size: int = 64  # strings embedded together
    out: str = "score"  # the stage's folder in the run


@dataclasses.dataclass
class CompareConfig:
    # Alternatives scored beside this run's on the same rows, each named by
    # its folder: a .csv of another predict run's outputs (model_outputs.csv,
    # e.g. predict.adapter=best predict.out=predict_best), alone and with
    # the mean prompt; a .txt mean prompt of another mean-prompt run (e.g.
    # mean_prompt.objective=combined mean_prompt.out=mean_prompt_combined),
    # alone and after the model.
    alternatives: list[str] = dataclasses.field(default_factory=list)
    out: str = "compare"  # the stage's folder in the run


@dataclasses.dataclass
class ExportConfig:
    # "run": this run's fine-tuned adapter; "best": its best by the
    # validation score; "none": the base model alone; or a path to a
    # .lora.h5 file. The adapter is merged into the weights.
    adapter: str = "run"
    # Also write the adapter alone in PEFT's format (peft_adapter/).
    peft: bool = True
    # Write the merged model in transformers format (transformers/; 17 GB for
    # Gemma 7B). Not needed when the Kaggle bundle ships the PEFT adapter for
    # Kaggle's own base model.
    merged: bool = True
    out: str = "export"  # the stage's folder in the run


@dataclasses.dataclass
class KaggleConfig:
    """The offline submission bundle (`make kaggle-bundle`) and the notebook
    that runs it with the internet off."""

    # The base model in transformers format as the notebook sees it: a
    # Kaggle Models input (Gemma 7B instruct), or "export" to ship this
    # run's merged export inside the bundle instead (small models only).
    base_model: str = "/kaggle/input/models/google/gemma/transformers/7b-it/3"
    # The notebook's test CSV (a /kaggle/input path is found in either layout).
    input: str = "/kaggle/input/competitions/llm-prompt-recovery/test.csv"
    output: str = "/kaggle/working/submission.csv"  # the notebook's submission
    # T4 and P100 have no fast bfloat16; float16 runs on their tensor cores.
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float16"
    # The wheels are fetched for the notebook's Python (Kaggle's image runs
    # 3.12 since December 2025) and platforms.
    python_version: str = "3.12"
    platforms: list[str] = dataclasses.field(  # the platform tags of the wheels
        default_factory=lambda: [
            "manylinux_2_28_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux_2_12_x86_64",
        ]
    )
    out: str = "kaggle_bundle"  # the stage's folder in the run


@dataclasses.dataclass
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    distribution: DistributionConfig = dataclasses.field(default_factory=DistributionConfig)
    hardware: HardwareConfig = dataclasses.field(default_factory=HardwareConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mean_prompt: MeanPromptConfig = dataclasses.field(default_factory=MeanPromptConfig)
    predict: PredictConfig = dataclasses.field(default_factory=PredictConfig)
    score: ScoreConfig = dataclasses.field(default_factory=ScoreConfig)
    compare: CompareConfig = dataclasses.field(default_factory=CompareConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    kaggle: KaggleConfig = dataclasses.field(default_factory=KaggleConfig)


def load_config(path=None, overrides=()):
    """Reads `path` (the embedded default when None), applies `key=value`
    overrides and returns a validated `Config`."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raise ConfigError(
            f"{path}: the file is empty; a config names at least its run (run: name: ...)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    return _build(Config, raw, "", str(path))


def save_config(cfg, path):
    """Writes the resolved config as YAML (saved beside each stage's outputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def with_overrides(cfg, overrides):
    """`cfg` with `key=value` overrides applied, validated as a file's."""
    raw = dataclasses.asdict(cfg)
    for item in overrides:
        _apply_override(raw, item)
    return _build(Config, raw, "", "override")


def split_grid(overrides):
    """(plain overrides, grid axes {key: [values]}). An override is an axis
    when its value is a list of what the key takes: `lora.rank=[2,4]`, or
    `lora.target_layers=[[query,value],[query,key,value]]` for a key that
    takes a list itself."""
    plain, axes = [], {}
    for item in overrides:
        key, _, value = item.partition("=")
        values = yaml.safe_load(value) if value else None
        takes_list = typing.get_origin(_hint_of(key)) is list
        if isinstance(values, list) and (
            not takes_list or (values and all(isinstance(v, list) for v in values))
        ):
            if not values:
                raise ConfigError(f"override {item!r}: give the grid's values, e.g. {key}=[2,4]")
            axes[key] = values
        else:
            plain.append(item)
    return plain, axes


def override_text(key, value):
    """`key=value` for a value loaded from YAML (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def _hint_of(key):
    """The type a dotted key takes, None allowed or not (None for a key the
    config lacks)."""
    hint = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def _apply_override(raw, item):
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. lora.rank=8")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value)


def _build(cls, data, where, source):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{source}: unknown key {key!r}; known keys here: {', '.join(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required key {_join(where, missing[0])!r}")
    values = {
        name: _convert(hints[name], value, _join(where, name), source)
        for name, value in data.items()
    }
    return cls(**values)


def _convert(hint, value, where, source):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{source}: {where} must be one of {', '.join(map(str, args))}; got {value!r}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where} must be a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _is_number(value):
        return float(value)  # YAML reads 1e-4 (no dot) as a string
    if hint in (int, float, str, bool) and (
        type(value) is hint or (hint is float and isinstance(value, float))
    ):
        return value
    raise ConfigError(
        f"{source}: {where} must be {hint.__name__}, got {type(value).__name__} {value!r}"
    )


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _join(where, name):
    return f"{where}.{name}" if where else name
