"""Benchmark (not a test): the pipeline's generation and training throughput
against the reference notebooks' methods, side by side, same model, same run,
on the CPU (the tiny preset of the embedded default on the (1, 8) mesh of 8
virtual devices). For accelerators, see bench/gpu_throughput.py.

- generation: rows/s (and new tokens/s) of the data stage's length-bucketed
  batched generation vs the reference method, `generate(prompt,
  max_length=512)` one row per call, on the same rewrite requests, with the
  data stage's batch size and bound on new tokens; also with KerasHub's own
  `generate` on the same buckets, to show what the pipeline's decoder adds;
- training: real (non-padding) tokens/s of length-bucketed batches vs every
  row padded to the maximum length, on a length mix like the reference data
  (texts of up to 256 words, prompts of 3 to 60 words);
- decoding bytes: one decoding step's bytes read and written, by XLA's cost
  analysis of the compiled step, over what it must read (every weight once
  and the KV cache): `decode_bytes_accessed_ratio`, at 32 rows, for the tiny
  model and slices of a few blocks at the width of each family's 7B-class
  model (`DECODE_WIDTHS`: Gemma 7B and 2B, Gemma 3 12B,
  Gemma 4 E4B, Mistral 7B, Llama 3 8B, Qwen 3 8B; compiled, not run).

Steady state is timed: every shape is compiled in a warm-up pass first.
Writes bench/results/throughput.json.

    make bench
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline.parallel.runtime import setup_environment
from pipeline.run.config import load_config

ROOT = Path(__file__).resolve().parent.parent


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
    from pipeline.models.generation import BatchedGenerator

    generator = BatchedGenerator(
        causal_lm, tokenizer, batch_size, max_new_tokens, log=lambda *_: None, decode=decode
    )
    for _ in generator.generate(prompts):
        pass
    start = time.perf_counter()
    for _ in generator.generate(prompts):
        pass
    seconds = time.perf_counter() - start
    return {
        "rows_per_second": len(prompts) / seconds,
        "new_tokens_per_second": generator.new_tokens / seconds,
        "compiled_shapes": len(generator.programs),
        "seconds": seconds,
        "rows": len(prompts),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
    }


def keras_hub_decode(causal_lm, stops):
    """KerasHub's own `generate` in the decoder's calling convention."""

    def decode(token_ids, padding_mask, max_new_tokens):
        out = causal_lm.generate(
            {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=stops
        )
        return out["token_ids"]

    return decode


def time_reference_generation(causal_lm, tokenizer, texts):
    """The reference notebook: one row per call, max_length=512. With random
    weights a row runs to 512 tokens unless it draws `<eos>`, so its new
    tokens are at most 512 minus the prompt's (an upper bound on its tokens/s)."""
    import keras_hub

    from pipeline.text.tokens import tokenize_batch

    reference = keras_hub.models.GemmaCausalLM(
        backbone=causal_lm.backbone,
        preprocessor=keras_hub.models.GemmaCausalLMPreprocessor(tokenizer),
    )
    reference.generate(texts[0], max_length=512)  # warm-up: compile
    start = time.perf_counter()
    for text in texts:
        reference.generate(text, max_length=512)
    seconds = time.perf_counter() - start
    new_tokens = sum(512 - len(ids) for ids in tokenize_batch(tokenizer, texts, add_bos=True))
    return {
        "rows_per_second": len(texts) / seconds,
        "new_tokens_per_second": new_tokens / seconds,
        "seconds": seconds,
        "rows": len(texts),
    }


def time_training(causal_lm, formatter, df, batch_size, length_step):
    """Real tokens/s of the pipeline's train step over one epoch of the
    stage's batch plan; a first pass over the same batches compiles every shape."""
    from pipeline.models.lora_training import compile_lora_training
    from pipeline.models.model import family_of, forward_inputs
    from pipeline.run.config import TrainConfig
    from pipeline.text.batching import TrainingBatches

    rows, _ = formatter.encode(df)
    plan = TrainingBatches(rows, batch_size, formatter.sequence_length, length_step, seed=0)
    family = family_of(causal_lm)
    batches = [(forward_inputs(family, x), y, w) for x, y, w in map(rows.arrays, plan.epoch(0))]
    compile_lora_training(causal_lm, TrainConfig(learning_rate=1e-4))
    for x, y, w in batches:
        causal_lm.train_on_batch(x, y, sample_weight=w)
    start = time.perf_counter()
    for x, y, w in batches:
        causal_lm.train_on_batch(x, y, sample_weight=w)
    seconds = time.perf_counter() - start
    return {
        "real_tokens_per_second": plan.real_tokens / seconds,
        "real_fraction": plan.real_tokens / plan.computed_tokens,
        "batches": len(batches),
        "seconds": seconds,
        "compiled_shapes": len({x["token_ids"].shape for x, _, _ in batches}),
    }


def cpu_benchmark(args):
    import keras_hub
    import pandas as pd

    from pipeline.models.families import gemma
    from pipeline.models.model import enable_lora, load_model
    from pipeline.models.tiny import BACKBONE_CONFIG, TINY_DIR, build_tiny_artifacts
    from pipeline.stages.data import plan_rows
    from pipeline.text.recovery import RecoveryFormatter
    from pipeline.text.templates import format_rewrite_request
    from pipeline.text.tokens import stop_token_ids, tokenize_batch

    build_tiny_artifacts(ROOT / TINY_DIR)
    cfg = load_config(None)
    batch_size = args.generation_batch or cfg.data.batch_size
    max_new_tokens = args.max_new_tokens or cfg.data.max_new_tokens
    causal_lm, tokenizer = load_model(cfg, [batch_size, cfg.train.batch_size])

    # The pre-trained tiny model ends after a few tokens; an instruct model
    # writes rewrites of hundreds. Random weights of the same architecture
    # (sharded the same way) rarely stop, so both methods run to their limit.
    writer = keras_hub.models.GemmaCausalLM(
        backbone=keras_hub.models.GemmaBackbone(**BACKBONE_CONFIG), preprocessor=None
    )
    plan = plan_rows(cfg.data, log=lambda *_: None).head(args.generation_rows)
    requests = [
        format_rewrite_request(
            cfg.data.template, r.rewrite_prompt, r.original_text, gemma.CHAT_TURN
        )
        for r in plan.itertuples()
    ]
    prompts = tokenize_batch(tokenizer, requests, add_bos=True)
    reference = time_reference_generation(writer, tokenizer, requests[: args.reference_rows])
    pipeline = time_generation(writer, tokenizer, prompts, batch_size, max_new_tokens)
    keras_hub_batched = time_generation(
        writer,
        tokenizer,
        prompts,
        batch_size,
        max_new_tokens,
        decode=keras_hub_decode(writer, stop_token_ids(tokenizer, gemma.END_OF_TURN)),
    )

    decode_bytes = decode_bytes_benchmark(writer)
    enable_lora(causal_lm, cfg.lora)
    df = pd.DataFrame(length_mix(args.training_rows))
    formatter = RecoveryFormatter(
        tokenizer, cfg.train.template, args.sequence_length, cfg.train.max_response_tokens
    )
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
        "generation_new_tokens_per_second_ratio": pipeline["new_tokens_per_second"]
        / reference["new_tokens_per_second"],
        "generation_decoder_vs_keras_hub_generate": pipeline["rows_per_second"]
        / keras_hub_batched["rows_per_second"],
        "training_speedup": bucketed["real_tokens_per_second"] / fixed["real_tokens_per_second"],
        "decode_bytes": decode_bytes,
        "decode_bytes_accessed_ratio": {
            name: figures["ratio"] for name, figures in decode_bytes.items()
        },
    }


def decode_bytes(causal_lm, rows, length):
    """One decoding step's bytes (XLA's cost analysis) against the floor."""
    from pipeline.models.decoding import CachedDecoder
    from pipeline.models.decoding_cost import step_bytes_accessed, step_floor_bytes

    decoder = CachedDecoder(causal_lm, stop_token_ids=[1])
    accessed, floor = (
        step_bytes_accessed(decoder, rows, length),
        step_floor_bytes(decoder, rows, length),
    )
    return {
        "rows": rows,
        "cache_length": length,
        "bytes_accessed": int(accessed),
        "floor_bytes": int(floor),
        "ratio": accessed / floor,
    }


# Each family's 7B-class architecture (Gemma 3's 12B, the one whose key/value
# heads the (1, 8) mesh shards), and Gemma 2B's one key/value head.
TWO_LAYERS = dict(num_layers=2)
# Gemma 4's blocks differ: a slice keeps one of each kind (local and global,
# with keys and values of their own, then reading those of the first two).
GEMMA4_KINDS = dict(
    num_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2
)
# (family, architecture, the slice of its blocks compiled).
DECODE_WIDTHS = (
    ("gemma", "gemma_7b", TWO_LAYERS),
    ("gemma", "gemma_2b", TWO_LAYERS),
    ("gemma3", "gemma3_12b", TWO_LAYERS),
    ("gemma4", "gemma4_4b", GEMMA4_KINDS),
    ("mistral", "mistral_7b", TWO_LAYERS),
    ("llama3", "llama3_8b", TWO_LAYERS),
    ("qwen3", "qwen3_8b", TWO_LAYERS),
)


def decode_bytes_benchmark(tiny_lm, rows=32, length=640):
    """At the data stage's 7B shapes (a 384-token prompt bucket + 256 new
    tokens): the tiny model, and a slice of a few blocks of each
    architecture of `DECODE_WIDTHS`, each in its own process (a slice of Gemma 3 12B
    takes 17 GB to build and compile in float32). Float32: XLA on the CPU
    widens bfloat16 products to float32, which a GPU does not, so bfloat16
    here would measure the CPU, not the decoder."""
    import subprocess
    import sys

    figures = {"tiny": decode_bytes(tiny_lm, rows, length)}
    for family, architecture, cut in DECODE_WIDTHS:
        out = subprocess.run(
            [sys.executable, __file__, "--decode-bytes-of", f"{family}:{architecture}"],
            cwd=ROOT,
            check=True,
            stdout=subprocess.PIPE,  # its stderr shows, should it fail
            text=True,
        ).stdout
        figures[f"{architecture}_width_{cut['num_layers']}_layers"] = json.loads(
            out.splitlines()[-1]
        )
    return figures


def sliced_decode_bytes(name, rows=32, length=640):
    """`decode_bytes` of the slice `DECODE_WIDTHS` names of
    `family:architecture`, random weights, no mesh (the figures need shapes
    only, and 2B's one key/value head could not be sharded over it)."""
    import keras_hub

    from pipeline.models.families.registry import FAMILIES

    family_name, architecture = name.split(":")
    family = FAMILIES[family_name]
    (cut,) = [c for f, a, c in DECODE_WIDTHS if (f, a) == (family_name, architecture)]
    config = dict(family.architectures[architecture], **cut)
    backbone = getattr(keras_hub.models, family.backbone_class)(**config, dtype="float32")
    sliced = getattr(keras_hub.models, family.causal_lm_class)(backbone=backbone, preprocessor=None)
    return decode_bytes(sliced, rows, length)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generation-rows", type=int, default=64)
    parser.add_argument(
        "--reference-rows", type=int, default=8, help="rows for the slow one-per-call method"
    )
    parser.add_argument(
        "--generation-batch", type=int, help="default: data.batch_size of the embedded default"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="default: data.max_new_tokens of the embedded default"
    )
    parser.add_argument("--training-rows", type=int, default=96)
    parser.add_argument("--sequence-length", type=int, default=1792)
    parser.add_argument("--length-step", type=int, default=128)
    parser.add_argument("--decode-bytes-of", help=argparse.SUPPRESS)  # family:architecture
    args = parser.parse_args()
    if args.decode_bytes_of:  # a child of `decode_bytes_benchmark`
        setup_environment(load_config(None, ["distribution.host_device_count=0"]).distribution)
        print(json.dumps(sliced_decode_bytes(args.decode_bytes_of)))
        return
    setup_environment(load_config(None).distribution)
    result = cpu_benchmark(args)
    result["date"] = time.strftime("%Y-%m-%d")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(
        f"generation_speedup: {result['generation_speedup']:.1f}x (rows/s, pipeline vs one row per "
        "call)"
    )
    print(
        f"  new tokens/s: {result['generation_new_tokens_per_second_ratio']:.1f}x; "
        "decoder vs KerasHub generate on the same buckets: "
        f"{result['generation_decoder_vs_keras_hub_generate']:.1f}x"
    )
    print(
        f"training_speedup: {result['training_speedup']:.2f}x (real tokens/s, length buckets vs "
        "fixed padding)"
    )
    ratios = ", ".join(
        f"{name} {r:.3f}" for name, r in result["decode_bytes_accessed_ratio"].items()
    )
    print(f"decode_bytes_accessed_ratio (step bytes / weights + KV cache, 32 rows): {ratios}")


if __name__ == "__main__":
    main()
