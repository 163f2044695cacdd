"""Benchmark (not a test): the pipeline's generation and training throughput
against the reference notebooks' methods, side by side, same model, same run.

- generation: rows/s (and new tokens/s) of the data stage's length-bucketed
  batched generation vs the reference method, `generate(prompt,
  max_length=512)` one row per call, on the same rewrite requests;
- training: real (non-padding) tokens/s of length-bucketed batches vs every
  row padded to the maximum length, on a length mix like the reference data
  (texts of up to 256 words, prompts of 3 to 60 words).

CPU mode (default) uses the tiny preset of the embedded default on the
(1, 8) mesh of 8 virtual devices, and the data stage's batch size and bound
on new tokens from it; generation is also timed with KerasHub's own
`generate` on the same buckets, to show what the pipeline's decoder adds. `--gpu` uses Gemma-2B and Gemma-7B
architectures with random weights in bfloat16 on one accelerator, the
pipeline's own train step and generation, and, where torch, transformers
and peft are installed, HF transformers + PEFT on the same shapes as ratios
(`pip install torch transformers peft` on that machine). Steady state is timed: every
shape is compiled in a warm-up pass first. Writes bench/results/throughput.json
with `generation_speedup` and `training_speedup` (CPU mode), or
bench/results/throughput_gpu.json with one entry per architecture (GPU mode).

    make bench                       # CPU, tiny preset
    python bench/throughput.py --gpu # on a GPU machine
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from pipeline.config import load_config
from pipeline.runtime import setup_environment

ROOT = Path(__file__).resolve().parent.parent

# Gemma 1 architectures (KerasHub preset configs), for random-weight runs.
GEMMA_ARCHITECTURES = {
    "gemma_2b": dict(vocabulary_size=256000, num_layers=18, num_query_heads=8, num_key_value_heads=1,
                     hidden_dim=2048, intermediate_dim=32768, head_dim=256),
    "gemma_7b": dict(vocabulary_size=256000, num_layers=28, num_query_heads=16, num_key_value_heads=16,
                     hidden_dim=3072, intermediate_dim=49152, head_dim=256),
}


def length_mix(n_rows, seed=0):
    """Rows shaped like the reference data: original texts of 20-256 words
    (chunk tails included), rewrites from a title to a longer retelling,
    prompts of 3-60 words; words drawn from the demo text."""
    rng = np.random.default_rng(seed)
    words = (ROOT / "demo" / "texts.txt").read_text().split()
    pick = lambda n: " ".join(rng.choice(words, size=n))  # noqa: E731
    return [
        {
            "original_text": pick(int(rng.integers(20, 257))),
            "rewritten_text": pick(int(rng.integers(10, 300))),
            "rewrite_prompt": pick(int(rng.integers(3, 61))),
        }
        for _ in range(n_rows)
    ]


def time_generation(causal_lm, tokenizer, prompts, batch_size, max_new_tokens, decode=None):
    """The data stage's generation; a first pass compiles every bucket."""
    from pipeline.generation import BatchedGenerator

    generator = BatchedGenerator(causal_lm, tokenizer, batch_size, max_new_tokens, log=lambda *_: None, decode=decode)
    for _ in generator.generate(prompts):
        pass
    start = time.perf_counter()
    for _ in generator.generate(prompts):
        pass
    seconds = time.perf_counter() - start
    return {"rows_per_second": len(prompts) / seconds, "new_tokens_per_second": generator.new_tokens / seconds,
            "compiled_shapes": len(generator.programs), "seconds": seconds, "rows": len(prompts),
            "batch_size": batch_size, "max_new_tokens": max_new_tokens}


def keras_hub_decode(causal_lm, stops):
    """KerasHub's own `generate` in the decoder's calling convention."""

    def decode(token_ids, padding_mask, max_new_tokens):
        out = causal_lm.generate({"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=stops)
        return out["token_ids"]

    return decode


def time_reference_generation(causal_lm, tokenizer, texts):
    """The reference notebook: one row per call, max_length=512. With random
    weights a row runs to 512 tokens unless it draws `<eos>`, so its new
    tokens are at most 512 minus the prompt's (an upper bound on its tokens/s)."""
    import keras_hub

    from pipeline.tokens import tokenize_batch

    reference = keras_hub.models.GemmaCausalLM(
        backbone=causal_lm.backbone, preprocessor=keras_hub.models.GemmaCausalLMPreprocessor(tokenizer)
    )
    reference.generate(texts[0], max_length=512)  # warm-up: compile
    start = time.perf_counter()
    for text in texts:
        reference.generate(text, max_length=512)
    seconds = time.perf_counter() - start
    new_tokens = sum(512 - len(ids) for ids in tokenize_batch(tokenizer, texts, add_bos=True))
    return {"rows_per_second": len(texts) / seconds, "new_tokens_per_second": new_tokens / seconds,
            "seconds": seconds, "rows": len(texts)}


def time_training(causal_lm, formatter, df, batch_size, length_step):
    """Real tokens/s of the pipeline's train step over one epoch of the
    stage's batch plan; a first pass over the same batches compiles every shape."""
    from pipeline.batching import TrainingBatches
    from pipeline.config import TrainConfig
    from pipeline.finetune import compile_lora_training

    rows, _ = formatter.encode(df)
    plan = TrainingBatches(rows, batch_size, formatter.sequence_length, length_step, seed=0)
    batches = [rows.arrays(batch) for batch in plan.epoch(0)]
    compile_lora_training(causal_lm, TrainConfig(learning_rate=1e-4))
    for x, y, w in batches:
        causal_lm.train_on_batch(x, y, sample_weight=w)
    start = time.perf_counter()
    for x, y, w in batches:
        causal_lm.train_on_batch(x, y, sample_weight=w)
    seconds = time.perf_counter() - start
    return {"real_tokens_per_second": plan.real_tokens / seconds,
            "real_fraction": plan.real_tokens / plan.computed_tokens,
            "batches": len(batches), "seconds": seconds, "compiled_shapes": len({x["token_ids"].shape for x, _, _ in batches})}


def cpu_benchmark(args):
    import pandas as pd

    from pipeline.data import plan_rows
    from pipeline.tokens import stop_token_ids, tokenize_batch
    from pipeline.model import enable_lora, load_gemma
    from pipeline.recovery import RecoveryFormatter
    from pipeline.templates import format_rewrite_request
    from pipeline.tiny import BACKBONE_CONFIG, TINY_DIR, build_tiny_artifacts

    import keras_hub

    build_tiny_artifacts(ROOT / TINY_DIR)
    cfg = load_config(None)
    batch_size = args.generation_batch or cfg.data.batch_size
    max_new_tokens = args.max_new_tokens or cfg.data.max_new_tokens
    causal_lm, tokenizer = load_gemma(cfg, [batch_size, cfg.train.batch_size])

    # The pre-trained tiny model ends after a few tokens; an instruct model
    # writes rewrites of hundreds. Random weights of the same architecture
    # (sharded the same way) rarely stop, so both methods run to their limit.
    writer = keras_hub.models.GemmaCausalLM(
        backbone=keras_hub.models.GemmaBackbone(**BACKBONE_CONFIG), preprocessor=None
    )
    plan = plan_rows(cfg.data, log=lambda *_: None).head(args.generation_rows)
    requests = [format_rewrite_request(cfg.data.template, r.rewrite_prompt, r.original_text) for r in plan.itertuples()]
    prompts = tokenize_batch(tokenizer, requests, add_bos=True)
    reference = time_reference_generation(writer, tokenizer, requests[: args.reference_rows])
    pipeline = time_generation(writer, tokenizer, prompts, batch_size, max_new_tokens)
    keras_hub_batched = time_generation(
        writer, tokenizer, prompts, batch_size, max_new_tokens, decode=keras_hub_decode(writer, stop_token_ids(tokenizer))
    )

    enable_lora(causal_lm, cfg.lora)
    df = pd.DataFrame(length_mix(args.training_rows))
    formatter = RecoveryFormatter(tokenizer, cfg.train.template, args.sequence_length, cfg.train.max_response_tokens)
    df, _ = formatter.fit_texts(df)
    fixed = time_training(causal_lm, formatter, df, cfg.train.batch_size, None)
    bucketed = time_training(causal_lm, formatter, df, cfg.train.batch_size, args.length_step)
    return {
        "machine": "CPU, 8 virtual devices, (1, 8) mesh; tiny preset (configs/cpu_tiny.yaml)",
        "generation": {
            "model": "tiny architecture, random weights",
            "reference_one_row_per_call_max_length_512": reference,
            "pipeline": pipeline,
            "pipeline_buckets_with_keras_hub_generate": keras_hub_batched,
        },
        "training": {
            "rows": len(df),
            "sequence_length": args.sequence_length,
            "fixed_padding": fixed,
            "length_buckets": dict(bucketed, length_step=args.length_step),
        },
        "generation_speedup": pipeline["rows_per_second"] / reference["rows_per_second"],
        "generation_new_tokens_per_second_ratio": pipeline["new_tokens_per_second"] / reference["new_tokens_per_second"],
        "generation_decoder_vs_keras_hub_generate": pipeline["rows_per_second"] / keras_hub_batched["rows_per_second"],
        "training_speedup": bucketed["real_tokens_per_second"] / fixed["real_tokens_per_second"],
    }


def training_tokens_per_second(causal_lm, batch, length, steps):
    """The compiled train step on random tokens; the first step compiles."""
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, 1000, (batch, length)).astype("int32"),
         "padding_mask": np.ones((batch, length), bool)}
    y = rng.integers(1, 1000, (batch, length)).astype("int32")
    causal_lm.train_on_batch(x, y)  # compile
    start = time.perf_counter()
    for _ in range(steps):
        causal_lm.train_on_batch(x, y)
    return steps * batch * length / (time.perf_counter() - start)


def new_tokens_per_second(generate, new_tokens):
    """One timed call after a compiling one."""
    generate()
    start = time.perf_counter()
    generate()
    return new_tokens / (time.perf_counter() - start)


def gpu_benchmark(args):
    """Random-weight Gemma architectures in bfloat16 on one accelerator."""
    import keras
    import keras_hub

    from pipeline import flops
    from pipeline.config import LoraConfig, TrainConfig
    from pipeline.decoding import GemmaDecoder
    from pipeline.finetune import compile_lora_training
    from pipeline.model import enable_lora

    keras.config.set_dtype_policy("bfloat16")
    from pipeline.tiny import BACKBONE_CONFIG

    architectures = dict(GEMMA_ARCHITECTURES, tiny=BACKBONE_CONFIG)
    results = {"machine": f"{jax_device()}, bfloat16, random weights"}
    for name in args.architectures.split(","):
        arch = architectures[name]
        batch, length = (4, 512) if name == "gemma_7b" else (8, 512)
        steps = 20
        hf = hf_baseline(arch, batch, length, steps)
        backbone = keras_hub.models.GemmaBackbone(**arch)
        causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
        enable_lora(causal_lm, LoraConfig(rank=4, target_layers=["query", "value"]))
        compile_lora_training(causal_lm, TrainConfig(learning_rate=1e-4))
        train_tps = training_tokens_per_second(causal_lm, batch, length, steps)
        prompt = {"token_ids": np.zeros((batch, 320), "int32"), "padding_mask": np.zeros((batch, 320), bool)}
        prompt["token_ids"][:, :256] = 5
        prompt["padding_mask"][:, :256] = True
        keras_hub_tps = new_tokens_per_second(lambda: causal_lm.generate(prompt, stop_token_ids=None), batch * 64)
        decoder = GemmaDecoder(causal_lm, stop_token_ids=[-1])  # no stop: all 64 tokens
        decode_tps = new_tokens_per_second(lambda: decoder(prompt["token_ids"], prompt["padding_mask"], 64), batch * 64)
        results[name] = {
            "batch": batch,
            "sequence_length": length,
            "training_tokens_per_second": train_tps,
            "training_mfu": flops.mfu(train_tps, flops.train_flops_per_token(arch, length), args.peak_tflops, 1),
            "greedy_decode_tokens_per_second_256_plus_64": decode_tps,
            "keras_hub_generate_tokens_per_second_256_plus_64": keras_hub_tps,
        }
        del causal_lm, backbone
        keras.backend.clear_session()
        if hf:
            results[name]["hf_transformers_peft"] = hf
            results[name]["training_ratio_vs_hf"] = train_tps / hf["training_tokens_per_second"]
            results[name]["decode_ratio_vs_hf"] = decode_tps / hf["greedy_decode_tokens_per_second_256_plus_64"]
            results[name]["keras_hub_generate_ratio_vs_hf"] = keras_hub_tps / hf["greedy_decode_tokens_per_second_256_plus_64"]
    return results


def hf_baseline(arch, batch, length, steps):
    """The same shapes in HF transformers + PEFT on torch (None where they
    are not installed): LoRA rank 4 on q/v, AdamW, bfloat16."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    config = transformers.GemmaConfig(
        vocab_size=arch["vocabulary_size"], hidden_size=arch["hidden_dim"],
        intermediate_size=arch["intermediate_dim"] // 2,  # KerasHub counts both gate halves
        num_hidden_layers=arch["num_layers"], num_attention_heads=arch["num_query_heads"],
        num_key_value_heads=arch["num_key_value_heads"], head_dim=arch["head_dim"],
    )
    model = transformers.GemmaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(1, 1000, (batch, length), device=device)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    train_tps = steps * batch * length / (time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        prompt = ids[:, :256]
        model.generate(input_ids=prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        sync()
        start = time.perf_counter()
        model.generate(input_ids=prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        sync()
    decode_tps = batch * 64 / (time.perf_counter() - start)
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()  # hand the memory back before JAX runs
    return {"training_tokens_per_second": train_tps, "greedy_decode_tokens_per_second_256_plus_64": decode_tps}


def jax_device():
    import jax

    return jax.devices()[0].device_kind


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="Gemma-2B/7B architectures on one accelerator")
    parser.add_argument("--architectures", default="gemma_2b,gemma_7b",
                        help="with --gpu: comma-separated, from gemma_2b, gemma_7b, tiny (a smoke test)")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 peak of the accelerator (MFU)")
    parser.add_argument("--generation-rows", type=int, default=64)
    parser.add_argument("--reference-rows", type=int, default=8, help="rows for the slow one-per-call method")
    parser.add_argument("--generation-batch", type=int, help="default: data.batch_size of the embedded default")
    parser.add_argument("--max-new-tokens", type=int, help="default: data.max_new_tokens of the embedded default")
    parser.add_argument("--training-rows", type=int, default=96)
    parser.add_argument("--sequence-length", type=int, default=1792)
    parser.add_argument("--length-step", type=int, default=128)
    args = parser.parse_args()
    if args.gpu:
        # JAX would take 75% of the GPU up front and leave torch too little.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        setup_environment(load_config(None, ["distribution.host_device_count=0"]).distribution)
        result = gpu_benchmark(args)
    else:
        setup_environment(load_config(None).distribution)
        result = cpu_benchmark(args)
    result["date"] = time.strftime("%Y-%m-%d")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / ("throughput_gpu.json" if args.gpu else "throughput.json")).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not args.gpu:
        print(f"generation_speedup: {result['generation_speedup']:.1f}x (rows/s, pipeline vs one row per call)")
        print(f"  new tokens/s: {result['generation_new_tokens_per_second_ratio']:.1f}x; "
              f"decoder vs KerasHub generate on the same buckets: {result['generation_decoder_vs_keras_hub_generate']:.1f}x")
        print(f"training_speedup: {result['training_speedup']:.2f}x (real tokens/s, length buckets vs fixed padding)")


if __name__ == "__main__":
    main()
