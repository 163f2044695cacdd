"""Benchmark (not a test): mean-prompt search throughput and cache hit rate.

Runs the beam search of the embedded default (tiny stand-in encoder, demo
prompts as targets) and prints candidates scored per second and the
embedding cache's hit rate; writes bench/results/mean_prompt.json.

    make bench
"""

import json
import time
from pathlib import Path

from pipeline.parallel.runtime import setup_environment
from pipeline.run.config import DistributionConfig

ROOT = Path(__file__).resolve().parent.parent

setup_environment(DistributionConfig())

from pipeline.models.tiny import TINY_DIR, build_tiny_artifacts  # noqa: E402
from pipeline.stages.mean_prompt import EmbeddingCache, MeanScore, beam_search, build_vocabulary  # noqa: E402
from pipeline.text.encoder import load_sentence_encoder  # noqa: E402
from pipeline.text.token_limit import TokenLimit  # noqa: E402


def main():
    tiny = build_tiny_artifacts(ROOT / TINY_DIR)
    targets = (ROOT / "demo" / "prompts.txt").read_text().splitlines() * 20
    cache = EmbeddingCache(load_sentence_encoder(tiny.encoder), batch_size=512)
    objective = MeanScore(cache, targets)
    vocabulary = build_vocabulary("words", targets, [], True, 1.0, objective)
    limit = TokenLimit(tiny.encoder / "assets" / "spiece.model", 128)
    scored = []
    counting = lambda candidates: scored.append(len(candidates)) or objective(candidates)  # noqa: E731
    start = time.perf_counter()
    best, history = beam_search(
        counting, vocabulary, beam_width=20, steps=8, fits=limit, moves="edit", log=lambda *_: None
    )
    seconds = time.perf_counter() - start
    result = {
        "machine": "CPU (tiny stand-in encoder)",
        "candidates_scored": sum(scored),
        "seconds": round(seconds, 3),
        "candidates_per_second": round(sum(scored) / seconds, 1),
        "strings_embedded": cache.misses,
        "cache_hit_rate": round(cache.hit_rate, 4),
        "best": best,
        "train_score": history[-1]["train"],
    }
    for key, value in result.items():
        print(f"{key:>20}: {value}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mean_prompt.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
