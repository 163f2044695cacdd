"""The export stage: the model with its LoRA adapter merged, in Hugging Face
transformers format (safetensors, config, tokenizer), and the adapter alone
in PEFT's format, for every family with a `TransformersFormat` (Gemma 1,
1.1 and 2, Gemma 3, Gemma 4, Mistral, Llama 3, Qwen 3).

The weights are named here, from each family's table of Keras weight paths
and transformers names, not by KerasHub's exporters: in keras-hub 0.32 they
write only the first key/value head of Gemma and map its query kernel right
only when heads x head_dim equals the hidden size (wrong for Gemma 7B), the
Gemma 3 one reads each layer's base kernel (an enabled LoRA adapter would be
silently lost), the Gemma one writes Gemma 2 as Gemma 1, and there is none
for Qwen 3. Here every projection is
written from `layer.kernel`, which Keras returns with the adapter merged
(kernel + alpha/rank * A @ B), and a weight without a name stops the export.
KerasHub's exporter still writes the config.json (Gemma 2's, Qwen 3's and
Gemma 4's are written here: KerasHub's Gemma 4 one leaves out
`attention_k_eq_v`) and the SentencePiece tokenizers; the rest of its
faults are worked around:

- `AutoTokenizer` cannot always load a SentencePiece folder (conversion
  needs sentencepiece and protobuf, or falls back to looking for a tiktoken
  file): `tokenizer.json` is written, so that `tokenizers` alone loads it;
- its Llama 3 `tokenizer.json` lists only the tokenizer's special tokens, so
  transformers would split the other unsplittable ones (`<|eot_id|>`); the
  byte-level BPE families' `tokenizer.json` is built here from the
  vocabulary, merges and unsplittable tokens, as KerasHub splits text.

KerasHub's LoRA on a per-head kernel has one A factor per head and a B
shared by the heads, so in PEFT's format (one A, one B per module) the q, k
and v adapters have rank heads x rank (B block-diagonal): exactly the same
update, written in PEFT's terms.

Example:
```python
cfg = load_config("configs/kaggle_tpu_v3_8.yaml")
paths = run_export_stage(cfg)  # runs/<name>/export/{transformers,peft_adapter}
model = transformers.AutoModelForCausalLM.from_pretrained(paths["transformers"])
```
"""

import json
import re

import numpy as np

from pipeline.errors import InputError
from pipeline.models.families.registry import FAMILIES, by_backbone_class
from pipeline.models.model import load_adapter, load_model, read_model_spec
from pipeline.run.run_dir import RunDir, pushes_run


def hf_weight(kind, value):
    """A Keras weight as transformers' ([out, in] for a projection).

    kind: "copy"; "transpose" ([in, out]); "heads_first" (a query, key or
    value kernel [heads, hidden, head_dim], Gemma's); "hidden_first" (one
    [hidden, heads, head_dim], the Llama-style block's); "output" (the
    attention output [heads, head_dim, hidden]); "scalar" (a Keras scalar,
    transformers' one-element buffer)."""
    if kind == "copy":
        return value
    if kind == "scalar":
        return value.reshape(1)
    if kind == "hidden_first":
        value = value.transpose(1, 0, 2)
        kind = "heads_first"
    if kind == "heads_first":
        heads, hidden, head_dim = value.shape
        return value.transpose(0, 2, 1).reshape(heads * head_dim, hidden)
    if kind == "output":
        heads, head_dim, hidden = value.shape
        return value.reshape(heads * head_dim, hidden).T
    if kind == "transpose":
        return value.T
    raise ValueError(f"unknown weight kind {kind!r}")


def peft_factors(kind, kernel_a, kernel_b):
    """(lora_A [rank', in], lora_B [out, rank']) with B @ A equal to
    `hf_weight(kind, kernel_a @ kernel_b)`, the update KerasHub's LoRA adds."""
    if kind == "hidden_first":
        kernel_a = kernel_a.transpose(1, 0, 2)
        kind = "heads_first"
    if kind == "heads_first":
        heads, hidden, rank = kernel_a.shape
        lora_a = kernel_a.transpose(0, 2, 1).reshape(heads * rank, hidden)
        lora_b = np.kron(np.eye(heads, dtype=kernel_b.dtype), kernel_b.T)
        return lora_a, lora_b
    if kind == "output":
        heads, head_dim, rank = kernel_a.shape
        return kernel_a.reshape(heads * head_dim, rank).T, kernel_b.T
    return kernel_a.T, kernel_b.T


def transformers_format(backbone):
    """The backbone's `TransformersFormat`: its family's, or that of its
    variant of the family (Gemma 2)."""
    return by_backbone_class(type(backbone).__name__).transformers_format(backbone.get_config())


def transformers_name(transformers_format, path):
    """(transformers name, kind) of the Keras weight at `path`; refuses a
    weight the format's table has no name for."""
    for keras_path, name, kind in transformers_format.weights:
        match = re.fullmatch(re.escape(keras_path).replace(re.escape("{i}"), r"(\d+)"), path)
        if match:
            return name.format(i=match.group(1)) if match.groups() else name, kind
    raise InputError(
        f"export: the weight {path} has no name in {transformers_format.architecture}, so this "
        "variant of the "
        "family cannot be exported; the other stages run on it"
    )


@pushes_run
def run_export_stage(cfg, log=print):
    """Writes `<run>/export/transformers/` (the merged model; with
    `export.merged`) and `<run>/export/peft_adapter/` (with `export.peft`).
    Returns their paths."""
    run = RunDir(cfg)
    if not cfg.export.merged and not (cfg.export.peft and run.export_adapter):
        raise InputError(
            "export.merged is false and there is no PEFT adapter to write (export.peft false, or "
            "export.adapter none): nothing to export"
        )
    spec = read_model_spec(cfg.model.preset)
    family = spec.family
    if family.transformers is None:
        built = ", ".join(f.name for f in FAMILIES.values() if f.transformers)
        raise InputError(
            f"export: model.preset is a {family.name} model; the transformers export (and the "
            "Kaggle bundle) is "
            f"built and checked for {built} only so far. The other stages run on {family.name}: "
            "predict writes "
            "the submission on the TPU"
        )
    stage_dir = run.start_stage(cfg, cfg.export.out)
    causal_lm, tokenizer = load_model(cfg, [cfg.distribution.mesh_shape[0]])
    adapter = run.export_adapter
    if adapter:
        load_adapter(causal_lm, adapter, cfg.model.preset)
    log(f"export: {cfg.model.preset} ({family.name}) + adapter {adapter or 'none (base model)'}")
    paths = {}
    if cfg.export.merged:
        write_transformers_model(causal_lm, tokenizer, run.transformers_model, cfg.model.dtype)
        paths["transformers"] = str(run.transformers_model)
        log(f"export: transformers model -> {run.transformers_model}")
    if adapter and cfg.export.peft:
        base = family.transformers_format(spec.config).base_models.get(
            str(cfg.model.preset), str(cfg.model.preset)
        )
        ranks = write_peft_adapter(causal_lm.backbone, run.peft_adapter, base)
        paths["peft_adapter"] = str(run.peft_adapter)
        log(f"export: PEFT adapter, ranks {ranks} -> {run.peft_adapter}")
    (stage_dir / "export.json").write_text(
        json.dumps(
            {
                **paths,
                "adapter": str(adapter) if adapter else None,
                "preset": str(cfg.model.preset),
            },
            indent=2,
        )
    )
    return paths


def merged_weights(backbone):
    """{Keras weight path: value} of the backbone, each LoRA-enabled
    kernel with its adapter merged."""
    from pipeline import keras_internals

    values = {
        weight.path: weight
        for weight in backbone.weights
        if not weight.path.endswith(("lora_kernel_a", "lora_kernel_b"))
    }
    for layer in keras_internals.lora_layers(backbone).values():
        values[f"{layer.path}/kernel"] = layer.kernel
    return {path: np.asarray(value) for path, value in values.items()}


def write_transformers_model(causal_lm, tokenizer, folder, dtype):
    """The merged model, its config and tokenizer, as transformers loads
    them (`AutoModelForCausalLM`, `AutoTokenizer`)."""
    write_transformers_weights(
        causal_lm,
        folder,
        dtype,
        bos_token_id=tokenizer.start_token_id,
        eos_token_id=tokenizer.end_token_id,
    )
    write_transformers_tokenizer(transformers_format(causal_lm.backbone), tokenizer, folder)


def write_transformers_weights(causal_lm, folder, dtype, **config_fields):
    """config.json (with `config_fields` added) and model.safetensors
    (LoRA merged)."""
    from safetensors.numpy import save_file

    backbone = causal_lm.backbone
    weight_names = transformers_format(backbone)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(transformers_config(backbone), torch_dtype=dtype, **config_fields)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weights = {}
    for path, value in merged_weights(backbone).items():
        name, kind = transformers_name(weight_names, path)
        weights[name] = np.ascontiguousarray(hf_weight(kind, value))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def transformers_config(backbone):
    """transformers' config.json of a backbone: the family's own, or
    KerasHub's exporter's; its `architectures` set."""
    from pipeline import keras_internals

    written_as = transformers_format(backbone)
    if written_as.config:
        config = written_as.config(backbone.get_config())
    else:
        config = keras_internals.keras_hub_transformers_config(backbone)
    return dict(config, architectures=[written_as.architecture])


def write_transformers_tokenizer(written_as, tokenizer, folder):
    """The tokenizer's files, tokenizer.json among them, as the
    `TransformersFormat` `written_as` says."""
    from pipeline import keras_internals

    if written_as.tokenizer == "byte_level_bpe":
        write_byte_level_bpe_tokenizer(tokenizer, written_as.tokenizer_config, folder)
    else:
        keras_internals.export_keras_hub_tokenizer(tokenizer, str(folder))
        write_tokenizer_json(folder)


def write_tokenizer_json(folder):
    """Converts the exported SentencePiece model to `tokenizer.json` with
    transformers' own converter, so loading needs `tokenizers` only."""
    import transformers

    transformers.AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))


def write_byte_level_bpe_tokenizer(tokenizer, tokenizer_config, folder):
    """`tokenizer.json` splitting text as KerasHub's `BytePairTokenizer`
    does (its split pattern, then byte-level BPE; the unsplittable tokens
    whole), and `tokenizer_config.json`."""
    import tokenizers

    from pipeline import keras_internals

    vocabulary = dict(tokenizer.vocabulary)
    merges = [
        tuple(merge.split(" ")) for merge in tokenizer.merges if not merge.startswith("#version:")
    ]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocabulary, merges=merges))
    hf.add_special_tokens(list(tokenizer.unsplittable_tokens))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split(
                tokenizers.Regex(keras_internals.bpe_split_pattern()), behavior="isolated"
            ),
            tokenizers.pre_tokenizers.ByteLevel(
                add_prefix_space=tokenizer.add_prefix_space, use_regex=False
            ),
        ]
    )
    hf.decoder = tokenizers.decoders.ByteLevel()
    if tokenizer_config.get("add_bos_token"):
        # As the published tokenizer.json does (Llama 3): the start token
        # first, by the post-processor that transformers' default call runs.
        bos = tokenizer_config["bos_token"]
        hf.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B:1",
            special_tokens=[(bos, hf.token_to_id(bos))],
        )
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def write_peft_adapter(backbone, folder, base_model):
    """The LoRA factors in PEFT's format; returns {module: rank} (a sorted
    tuple of ranks where a module's differ between layers, as Gemma 4's
    k_proj on the 31B, whose global layers have fewer heads)."""
    from safetensors.numpy import save_file

    from pipeline import keras_internals

    weight_names = transformers_format(backbone)
    tensors, module_ranks, scales = {}, {}, set()
    for layer in keras_internals.lora_layers(backbone).values():
        name, kind = transformers_name(weight_names, f"{layer.path}/kernel")
        lora_a, lora_b = peft_factors(
            kind, np.asarray(layer.lora_kernel_a), np.asarray(layer.lora_kernel_b)
        )
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(
            lora_a, dtype=np.float32
        )
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(
            lora_b, dtype=np.float32
        )
        module_ranks[module] = lora_a.shape[0]
        scales.add(layer.lora_alpha / layer.lora_rank)
    (scale,) = scales  # one alpha and rank for the whole adapter
    rank = min(module_ranks.values())
    by_name = {}
    for module, r in module_ranks.items():
        by_name.setdefault(module.split(".")[-1], set()).add(r)
    # PEFT's rank_pattern keys are regexes matched at the end of a module's name.
    wider = {}
    for name, ranks in by_name.items():
        if len(ranks) == 1:
            (only,) = ranks
            if only != rank:
                wider[name] = only
        else:
            wider.update(
                {
                    re.escape(module): r
                    for module, r in module_ranks.items()
                    if module.split(".")[-1] == name and r != rank
                }
            )
    # PEFT's LoraConfig fields (written as JSON: PEFT itself needs torch).
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": scale * rank,
        "target_modules": sorted(by_name),
        "rank_pattern": wider,
        "alpha_pattern": {module: scale * r for module, r in wider.items()},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {
        name: next(iter(ranks)) if len(ranks) == 1 else tuple(sorted(ranks))
        for name, ranks in by_name.items()
    }
