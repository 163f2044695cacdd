"""Benchmark (not a test): published architectures of every family (Gemma
2B/7B by default; `--architectures` takes any name of a family's
`architectures`, e.g. gemma3_4b, gemma4_4b, mistral_7b, llama3_8b, qwen3_8b) on one
accelerator, random weights in bfloat16, each measurement in a process of its
own.

Cases, each run by a fresh `python bench/gpu_throughput.py --case ARCH:WHAT`
so that nothing one leaves behind (compiled programs, memory, a torch
allocator) slows the next:

- `pipeline`: training as the stage trains (`fit` with its optimizer, loss
  and sample weights; LoRA r4 on q/v; tokens/s and MFU) and the family's
  decoder (`decoding.CachedDecoder`) over a batch sweep (256-token prompts
  + 64 new tokens): new tokens/s, ms per step, the step's bandwidth floor
  (the bytes it must read, `decoding_cost.step_floor_bytes`, over the memory
  bandwidth) as a fraction of the measured step, and XLA's count of the
  bytes its step moves over that floor;
- `keras_hub`: stock KerasHub on the same shapes: `fit` for training,
  `generate` over the same sweep;
- `data`: the data stage's job: the reference method (one row per
  `generate`, `max_length=512`, a 330-token request, so 182 new tokens) vs
  the decoder on a batch of rows with the same bound on new tokens;
- `hf`: HF transformers + PEFT on the same training and decoding shapes
  (where torch, transformers and peft are installed).

Writes bench/results/throughput_gpu.json: the device, the versions, the peak
figures used, and every case. `--quick` runs fewer steps and a shorter sweep
(8 and 32 rows), to finish within a few minutes on one GPU. On a CPU-only
machine `--architectures tiny,gemma4_tiny --quick --smoke` runs every path
on the tiny architectures at an eighth of the shapes (a smoke test;
tests/test_bench.py); `<family>_tiny`
is each family's stand-in architecture, `tiny` Gemma's.

    python bench/gpu_throughput.py --quick --peak-tflops 989 --bandwidth-gbs 4800   # H100/H200
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

CASES = ("pipeline", "keras_hub", "data", "hf")
PROMPT, NEW_TOKENS = 256, 64  # decoding shapes of the sweep
REFERENCE_PROMPT, REFERENCE_MAX_LENGTH = 330, 512  # the data stage's reference method
TRAINING_LENGTH = 512


def use_smoke_shapes():
    """`--smoke`: every path at an eighth of the shapes, to check the code on
    a CPU (tests/test_bench.py); its figures measure nothing."""
    global PROMPT, NEW_TOKENS, REFERENCE_PROMPT, REFERENCE_MAX_LENGTH, TRAINING_LENGTH
    PROMPT, NEW_TOKENS = 32, 8
    REFERENCE_PROMPT, REFERENCE_MAX_LENGTH = 40, 64
    TRAINING_LENGTH = 64


def architecture(name):
    """The `ModelSpec` of a published architecture (any family's) or of a
    family's tiny stand-in (`<family>_tiny`; `tiny` is Gemma's)."""
    from pipeline.models.families.family import ModelSpec
    from pipeline.models.families.registry import FAMILIES

    for family in FAMILIES.values():
        named = dict(family.architectures, **{f"{family.name}_tiny": family.tiny_config})
        if family.name == "gemma":
            named["tiny"] = family.tiny_config
        if name in named:
            return ModelSpec(family, named[name])
    known = [n for f in FAMILIES.values() for n in (*f.architectures, f"{f.name}_tiny")]
    raise SystemExit(f"--architectures: {name!r} is none of {', '.join(known)}")


def training_shape(spec):
    # 7B-wide models: 4 rows of 512
    return (4 if spec.dims.hidden_dim >= 3072 else 8), TRAINING_LENGTH


def random_lm(spec, lora):
    import keras
    import keras_hub

    from pipeline.models.model import enable_lora
    from pipeline.run.config import LoraConfig

    keras.config.set_dtype_policy("bfloat16")
    backbone = getattr(keras_hub.models, spec.family.backbone_class)(**spec.config)
    causal_lm = getattr(keras_hub.models, spec.family.causal_lm_class)(
        backbone=backbone, preprocessor=None
    )
    if lora:
        enable_lora(causal_lm, LoraConfig(rank=4, target_layers=["query", "value"]))
    return causal_lm


def fit_tokens_per_second(causal_lm, batch, length, steps, sample_weight):
    """Tokens/s of `fit` over `steps` batches of random tokens (the stage's
    path: `fit`, as finetune calls it), after a first, compiling `fit`."""
    from pipeline.models.model import family_of, forward_inputs

    rng = np.random.default_rng(0)
    rows = batch * steps
    x = forward_inputs(
        family_of(causal_lm),
        {
            "token_ids": rng.integers(1, 1000, (rows, length)).astype("int32"),
            "padding_mask": np.ones((rows, length), bool),
        },
    )
    y = rng.integers(1, 1000, (rows, length)).astype("int32")
    weight = np.ones((rows, length), "float32") if sample_weight else None

    def fit():
        causal_lm.fit(
            x, y, sample_weight=weight, batch_size=batch, epochs=1, shuffle=False, verbose=0
        )

    return rows * length / timed(fit, 1)


def prompts(batch, prompt_length, total_length):
    token_ids = np.zeros((batch, total_length), "int32")
    padding_mask = np.zeros((batch, total_length), bool)
    token_ids[:, :prompt_length] = 5
    padding_mask[:, :prompt_length] = True
    return token_ids, padding_mask


def timed(run, repeats):
    """Seconds of one run, after a first (compiling) one."""
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def pipeline_case(name, args):
    from pipeline.models import flops
    from pipeline.models.decoding import CachedDecoder
    from pipeline.models.decoding_cost import step_bytes_accessed, step_floor_bytes
    from pipeline.models.lora_training import compile_lora_training
    from pipeline.run.config import TrainConfig

    spec = architecture(name)
    causal_lm = random_lm(spec, lora=True)
    compile_lora_training(causal_lm, TrainConfig(learning_rate=1e-4))
    batch, length = training_shape(spec)
    tokens_per_second = fit_tokens_per_second(
        causal_lm, batch, length, args.steps, sample_weight=True
    )
    result = {
        "training": {
            "batch": batch,
            "sequence_length": length,
            "tokens_per_second": tokens_per_second,
            "mfu": flops.mfu(
                tokens_per_second, flops.train_flops_per_token(spec, length), args.peak_tflops, 1
            ),
        }
    }
    decoder = CachedDecoder(causal_lm, [-1])  # no stop: every row decodes all its tokens
    result["decoding"] = {}
    for rows in args.sweep:
        token_ids, padding_mask = prompts(rows, PROMPT, PROMPT + NEW_TOKENS)
        seconds = timed(functools.partial(decoder, token_ids, padding_mask, NEW_TOKENS), 1)
        step = seconds / NEW_TOKENS  # the prefill is counted in: a bound on the step time
        floor = step_floor_bytes(decoder, rows, PROMPT + NEW_TOKENS) / (args.bandwidth_gbs * 1e9)
        result["decoding"][rows] = {
            "new_tokens_per_second": rows * NEW_TOKENS / seconds,
            "ms_per_step": 1e3 * step,
            "floor_ms_per_step": 1e3 * floor,
            "fraction_of_bandwidth_floor": floor / step,
        }
        result["decoding"][rows]["bytes_accessed_ratio"] = step_bytes_accessed(
            decoder, rows, PROMPT + NEW_TOKENS
        ) / step_floor_bytes(decoder, rows, PROMPT + NEW_TOKENS)
    return result


def keras_hub_case(name, args):
    import keras

    spec = architecture(name)
    causal_lm = random_lm(spec, lora=True)
    causal_lm.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    batch, length = training_shape(spec)
    result = {
        "training": {
            "batch": batch,
            "sequence_length": length,
            "tokens_per_second": fit_tokens_per_second(
                causal_lm, batch, length, args.steps, sample_weight=False
            ),
        },
        "decoding": {},
    }
    for rows in args.sweep:
        token_ids, padding_mask = prompts(rows, PROMPT, PROMPT + NEW_TOKENS)
        inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
        seconds = timed(functools.partial(causal_lm.generate, inputs, stop_token_ids=None), 1)
        result["decoding"][rows] = {"new_tokens_per_second": rows * NEW_TOKENS / seconds}
    return result


def data_case(name, args):
    """One row per `generate` with max_length=512 (the reference) vs the
    decoder's batch, both bounded to the same new tokens."""
    from pipeline.models.decoding import CachedDecoder

    causal_lm = random_lm(architecture(name), lora=False)
    new_tokens = REFERENCE_MAX_LENGTH - REFERENCE_PROMPT
    one_row = dict(
        zip(
            ("token_ids", "padding_mask"),
            prompts(1, REFERENCE_PROMPT, REFERENCE_MAX_LENGTH),
            strict=True,
        )
    )
    reference_seconds = timed(
        lambda: causal_lm.generate(one_row, stop_token_ids=None), args.reference_rows
    )
    rows = args.data_rows
    bucket = -(-REFERENCE_PROMPT // 64) * 64  # the data stage's prompt bucket (length_step 64)
    token_ids, padding_mask = prompts(rows, REFERENCE_PROMPT, bucket + new_tokens)
    decoder = CachedDecoder(causal_lm, [-1])
    batch_seconds = timed(lambda: decoder(token_ids, padding_mask, new_tokens), 1)
    reference = {
        "rows_per_second": 1 / reference_seconds,
        "new_tokens_per_second": new_tokens / reference_seconds,
    }
    batched = {
        "rows": rows,
        "rows_per_second": rows / batch_seconds,
        "new_tokens_per_second": rows * new_tokens / batch_seconds,
    }
    return {
        "new_tokens_per_row": new_tokens,
        "reference_one_row_per_generate": reference,
        "decoder_batch": batched,
        "rows_per_second_ratio": batched["rows_per_second"] / reference["rows_per_second"],
        "new_tokens_per_second_ratio": batched["new_tokens_per_second"]
        / reference["new_tokens_per_second"],
    }


def hf_case(name, args):
    """The same training and decoding shapes in HF transformers + PEFT."""
    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        return {"skipped": f"not installed: {e.name}", "device": None}
    spec = architecture(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    config = transformers.AutoConfig.for_model(**hf_config(spec))
    model = transformers.AutoModelForCausalLM.from_config(config).to(
        device=device, dtype=torch.bfloat16
    )
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, length = training_shape(spec)
    ids = torch.randint(1, 1000, (batch, length), device=device)

    def train_step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sync()

    result = {
        "training": {
            "batch": batch,
            "sequence_length": length,
            "tokens_per_second": batch * length / timed(train_step, args.steps),
        },
        "decoding": {},
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
    }
    model.eval()
    for rows in args.sweep:
        prompt = torch.full((rows, PROMPT), 5, device=device)

        def generate(prompt=prompt):
            with torch.no_grad():
                model.generate(
                    input_ids=prompt,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                )
            sync()

        result["decoding"][rows] = {"new_tokens_per_second": rows * NEW_TOKENS / timed(generate, 1)}
    return result


def hf_config(spec):
    """transformers' config of the architecture, as the export writes it
    (`stages.export.transformers_config`): the family's own from the config,
    or KerasHub's exporter's, which reads a built backbone: one of at most 6
    layers (a whole Gemma 3 local/global pattern) and a small vocabulary, on
    the CPU (JAX_PLATFORMS, set by `run_case`), whose depth and vocabulary
    are set to the architecture's after."""
    from pipeline.stages.export import transformers_config

    written_as = spec.family.transformers_format(spec.config)
    if written_as.config:
        return dict(written_as.config(spec.config), architectures=[written_as.architecture])
    small = random_lm(
        type(spec)(
            spec.family,
            dict(spec.config, num_layers=min(spec.dims.num_layers, 6), vocabulary_size=256),
        ),
        lora=False,
    )
    config = transformers_config(small.backbone)
    config.update(vocab_size=spec.dims.vocabulary_size, num_hidden_layers=spec.dims.num_layers)
    if "layer_types" in config:
        pattern = config["layer_types"]
        config["layer_types"] = [pattern[i % len(pattern)] for i in range(spec.dims.num_layers)]
    config.pop("torch_dtype", None)
    return config


def versions():
    found = {}
    for package in ("jax", "jaxlib", "keras", "keras-hub", "torch", "transformers", "peft"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def run_case(arch, case, args):
    """One case in a fresh process; its result (the last line it prints)."""
    command = [
        sys.executable,
        __file__,
        "--case",
        f"{arch}:{case}",
        "--peak-tflops",
        str(args.peak_tflops),
        "--bandwidth-gbs",
        str(args.bandwidth_gbs),
    ] + [flag for flag in ("--quick", "--smoke") if getattr(args, flag[2:])]
    # The HF case builds a small Keras backbone for its config: on the CPU,
    # so that JAX does not take the accelerator's memory from torch.
    env = dict(os.environ, JAX_PLATFORMS="cpu") if case == "hf" else None
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode:
        return {
            "failed": done.stderr.strip().splitlines()[-1]
            if done.stderr.strip()
            else f"exit {done.returncode}"
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(results):
    """Pipeline vs stock KerasHub and vs HF + PEFT, side by side."""
    out = {}
    pipeline = results.get("pipeline", {})
    for other in ("keras_hub", "hf"):
        theirs = results.get(other, {})
        if "training" in pipeline and "training" in theirs:
            out[f"training_vs_{other}"] = (
                pipeline["training"]["tokens_per_second"] / theirs["training"]["tokens_per_second"]
            )
        for rows, ours in pipeline.get("decoding", {}).items():
            if rows in theirs.get("decoding", {}):
                out[f"decoding_{rows}_rows_vs_{other}"] = (
                    ours["new_tokens_per_second"]
                    / theirs["decoding"][rows]["new_tokens_per_second"]
                )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--architectures",
        default="gemma_2b,gemma_7b",
        help="comma-separated names of the families' architectures (gemma_7b, mistral_7b, "
        "llama3_8b, qwen3_8b, ...) or <family>_tiny",
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="bf16 peak of one device (H100/H200: 989)"
    )
    parser.add_argument(
        "--bandwidth-gbs", type=float, default=4800.0, help="memory bandwidth, GB/s (H200: 4800)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps, batch sweep 8 and 32")
    parser.add_argument(
        "--smoke", action="store_true", help="an eighth of the shapes: a CPU check of every path"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput_gpu.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # ARCH:CASE, run in this process
    args = parser.parse_args()
    if args.smoke:
        use_smoke_shapes()
    args.steps, args.reference_rows = (4, 2) if args.quick else (20, 4)
    args.sweep = [8, 32] if args.quick else [8, 32, 64, 128]
    args.data_rows = 32 if args.quick else 64

    from pipeline.parallel.runtime import setup_environment
    from pipeline.run.config import load_config

    if args.case:
        setup_environment(load_config(None, ["distribution.host_device_count=0"]).distribution)
        arch, case = args.case.split(":")
        result = globals()[f"{case}_case"](arch, args)
        if "device" not in result:  # the HF case names its own, without starting JAX
            import jax

            result["device"] = jax.devices()[0].device_kind
        print(json.dumps(result))
        return
    # This process never starts JAX: it would hold the accelerator the cases need.
    result = {
        "device": None,
        "versions": versions(),
        "quick": args.quick,
        "peak_tflops": args.peak_tflops,
        "bandwidth_gbs": args.bandwidth_gbs,
        "date": time.strftime("%Y-%m-%d"),
    }
    for arch in args.architectures.split(","):
        cases = {case: run_case(arch, case, args) for case in args.cases.split(",")}
        result["device"] = result["device"] or next(
            (c["device"] for c in cases.values() if "device" in c), None
        )
        result[arch] = dict(cases, ratios=ratios(cases))
        print(json.dumps({arch: result[arch]}, indent=2), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
