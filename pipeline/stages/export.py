"""The export stage: Gemma (1, 1.1, 2) with its LoRA adapter merged, in Hugging Face
transformers format (safetensors, config, tokenizer), and the adapter alone
in PEFT's format.

KerasHub's own exporter writes the files. Three of its faults in keras-hub
0.32 are worked around here (and checked by tests/test_export.py):

- it writes only the first key/value head (`key_dense.weights[0][0]`), and
  maps the query kernel right only when heads x head_dim equals the hidden
  size: wrong for Gemma 7B (16 key/value heads, 4096 vs 3072). The q, k and v
  projections are written here for every head (`hf_weight`);
- it reads each layer's base kernel, so an enabled LoRA adapter would be
  silently lost: the adapted projections are written from `layer.kernel`,
  which Keras returns with the adapter merged (kernel + alpha/rank * A @ B);
- `AutoTokenizer` cannot always load its folder (it has only the
  SentencePiece model, and conversion needs sentencepiece and protobuf, or
  falls back to looking for a tiktoken file): `tokenizer.json` is written
  here, so that `tokenizers` alone loads it.

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

import numpy as np

from pipeline.models.families.registry import FAMILIES
from pipeline.models.model import PER_HEAD_INPUT, PROJECTIONS, load_adapter, load_model, projections, read_model_spec
from pipeline.errors import InputError
from pipeline.run.run_dir import RunDir

# KerasHub projection -> the transformers module it becomes.
HF_MODULES = dict(zip(PROJECTIONS, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]))

# Known KerasHub presets and the Hugging Face model they were converted from.
HF_BASE_MODELS = {
    "gemma_2b_en": "google/gemma-2b",
    "gemma_instruct_2b_en": "google/gemma-2b-it",
    "gemma_7b_en": "google/gemma-7b",
    "gemma_instruct_7b_en": "google/gemma-7b-it",
}


def hf_weight(name, kernel):
    """A KerasHub kernel as the transformers weight [out, in]."""
    if name in PER_HEAD_INPUT:
        heads, hidden, head_dim = kernel.shape
        return kernel.transpose(0, 2, 1).reshape(heads * head_dim, hidden)
    if name == "attention_output":
        heads, head_dim, hidden = kernel.shape
        return kernel.reshape(heads * head_dim, hidden).T
    return kernel.T


def peft_factors(name, kernel_a, kernel_b):
    """(lora_A [rank', in], lora_B [out, rank']) with B @ A equal to
    `hf_weight(name, kernel_a @ kernel_b)`, the update KerasHub's LoRA adds."""
    if name in PER_HEAD_INPUT:
        heads, hidden, rank = kernel_a.shape
        lora_a = kernel_a.transpose(0, 2, 1).reshape(heads * rank, hidden)
        lora_b = np.kron(np.eye(heads, dtype=kernel_b.dtype), kernel_b.T)
        return lora_a, lora_b
    if name == "attention_output":
        heads, head_dim, rank = kernel_a.shape
        return kernel_a.reshape(heads * head_dim, rank).T, kernel_b.T
    return kernel_a.T, kernel_b.T


def run_export_stage(cfg, log=print):
    """Writes `<run>/export/transformers/` (the merged model; with
    `export.merged`) and `<run>/export/peft_adapter/` (with `export.peft`).
    Returns their paths."""
    run = RunDir(cfg)
    if not cfg.export.merged and not (cfg.export.peft and run.export_adapter):
        raise InputError("export.merged is false and there is no PEFT adapter to write (export.peft false, or "
                         "export.adapter none): nothing to export")
    family = read_model_spec(cfg.model.preset).family
    if not family.transformers_export:
        built = ", ".join(f.name for f in FAMILIES.values() if f.transformers_export)
        raise InputError(
            f"export: model.preset is a {family.name} model; the transformers export (and the Kaggle bundle) is "
            f"built and checked for {built} only so far. The other stages run on {family.name}: predict writes "
            "the submission on the TPU"
        )
    stage_dir = run.start_stage(cfg, cfg.export.out)
    causal_lm, tokenizer = load_model(cfg, [cfg.distribution.mesh_shape[0]])
    adapter = run.export_adapter
    if adapter:
        load_adapter(causal_lm, adapter)
    log(f"export: {cfg.model.preset} + adapter {adapter or 'none (base model)'}")
    paths = {}
    if cfg.export.merged:
        write_transformers_model(causal_lm, tokenizer, run.transformers_model, cfg.model.dtype)
        paths["transformers"] = str(run.transformers_model)
        log(f"export: transformers model -> {run.transformers_model}")
    if adapter and cfg.export.peft:
        base = HF_BASE_MODELS.get(str(cfg.model.preset), str(cfg.model.preset))
        ranks = write_peft_adapter(causal_lm.backbone, run.peft_adapter, base)
        paths["peft_adapter"] = str(run.peft_adapter)
        log(f"export: PEFT adapter, ranks {ranks} -> {run.peft_adapter}")
    (stage_dir / "export.json").write_text(json.dumps({**paths, "adapter": str(adapter) if adapter else None,
                                                       "preset": str(cfg.model.preset)}, indent=2))
    return paths


def write_transformers_model(causal_lm, tokenizer, folder, dtype):
    """KerasHub's exporter, with every head of q/k/v and LoRA merged."""
    from safetensors.numpy import save_file

    from pipeline import keras_internals

    get_config, get_weights, export_tokenizer = keras_internals.gemma_transformers_exporter()
    backbone = causal_lm.backbone
    folder.mkdir(parents=True, exist_ok=True)
    config = get_config(backbone)
    config.update(architectures=["GemmaForCausalLM"], torch_dtype=dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weights = {name: np.asarray(value) for name, value in get_weights(backbone).items()}
    for i, name, layer in projections(backbone):
        if name in PER_HEAD_INPUT or layer.lora_enabled:
            weights[f"model.layers.{i}.{HF_MODULES[name]}.weight"] = hf_weight(name, np.asarray(layer.kernel))
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    export_tokenizer(tokenizer, str(folder))
    write_tokenizer_json(folder)


def write_tokenizer_json(folder):
    """Converts the exported SentencePiece model to `tokenizer.json` with
    transformers' own Gemma converter, so loading needs `tokenizers` only."""
    import transformers

    transformers.AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))


def write_peft_adapter(backbone, folder, base_model):
    """The LoRA factors in PEFT's format; returns {module: rank}."""
    from safetensors.numpy import save_file

    tensors, ranks, scales = {}, {}, set()
    for i, name, layer in projections(backbone):
        if not layer.lora_enabled:
            continue
        lora_a, lora_b = peft_factors(name, np.asarray(layer.lora_kernel_a), np.asarray(layer.lora_kernel_b))
        module = f"base_model.model.model.layers.{i}.{HF_MODULES[name]}"
        tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(lora_a, dtype=np.float32)
        tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(lora_b, dtype=np.float32)
        ranks[HF_MODULES[name].split(".")[-1]] = lora_a.shape[0]
        scales.add(layer.lora_alpha / layer.lora_rank)
    (scale,) = scales  # one alpha and rank for the whole adapter
    rank = min(ranks.values())
    wider = {module: r for module, r in ranks.items() if r != rank}
    # PEFT's LoraConfig fields (written as JSON: PEFT itself needs torch).
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": scale * rank, "target_modules": sorted(ranks),
        "rank_pattern": wider, "alpha_pattern": {module: scale * r for module, r in wider.items()},
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return ranks
