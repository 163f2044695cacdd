"""The mean-prompt stage: one string that scores high against many prompts.

Beam search over strings of words (or the encoder's own SentencePiece
pieces) for the highest mean sharpened cosine similarity, with the score
stage's own metric and encoder, against the training rows' prompts; the
holdout rows' prompts give an unbiased score at every step. Each step
extends every beam by one vocabulary item (and, with `moves: edit`, inserts
or replaces one) and keeps the best `beam_width`; the search stops after
`steps`, when a step gains nothing, or when no candidate fits the encoder's
token limit (sentence-t5 sees 128 tokens: nothing past that is scored).
Every candidate string is embedded once (`EmbeddingCache`), in large batches.

Writes `mean_prompt.txt`, `search.json` (score per step) and
`search.png` into the run's mean_prompt folder. With `mean_prompt.clusters:
k` it also clusters the training targets (`pipeline/text/clusters.py`) and
searches each cluster's own mean prompt, into `clusters.json`.

Example:
```python
cache = EmbeddingCache(encoder, batch_size=512)
objective = MeanScore(cache, ["Make it rhyme.", "Make it formal."])
best, history = beam_search(
    objective, ["make", "it", "rhyme"], beam_width=4, steps=3, fits=lambda s: True
)
```
"""

import json
import time

import numpy as np

from pipeline.errors import InputError
from pipeline.parallel import hosts
from pipeline.run.run_dir import RunDir, pushes_run
from pipeline.text.clusters import MeanPromptClusters, kmeans
from pipeline.text.combine import combine_parts
from pipeline.text.encoder import embed, find_piece_model, load_sentence_encoder
from pipeline.text.tables import SUBMISSION_COLUMNS, read_table, split_rows
from pipeline.text.token_limit import TokenLimit


class EmbeddingCache:
    """Unit vectors of strings, each string embedded once."""

    def __init__(self, encoder, batch_size=512):
        self.encoder = encoder
        self.batch_size = batch_size
        self.vectors = {}
        self.hits = 0
        self.misses = 0

    def __call__(self, texts):
        missing = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        if missing:
            for text, vector in zip(
                missing, embed(self.encoder, missing, self.batch_size), strict=True
            ):
                self.vectors[text] = vector
        return np.stack([self.vectors[t] for t in texts])

    @property
    def hit_rate(self):
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class MeanScore:
    """mean over targets of cos(candidate, target)**3, per candidate."""

    def __init__(self, cache, targets):
        self.cache = cache
        self.targets = cache(list(targets))

    def __call__(self, candidates):
        return ((self.cache(list(candidates)) @ self.targets.T) ** 3).mean(axis=1)


class CombinedScore:
    """Per candidate, mean over rows of cos(output + candidate, target)**3:
    the score of what predict writes with combine [model, mean_prompt]
    (its join, fallback and cut). The joined strings are embedded without
    the cache: each is seen once."""

    def __init__(self, cache, outputs, targets, predict_cfg, cut):
        self.cache, self.outputs, self.cut = cache, list(outputs), cut
        self.separator, self.fallback = predict_cfg.separator, predict_cfg.fallback
        self.targets = cache(list(targets))

    def __call__(self, candidates):
        n = len(self.outputs)
        joined = []
        for candidate in candidates:
            prompts, _ = combine_parts(
                [self.outputs, [candidate] * n], self.separator, self.fallback, self.cut
            )
            joined.extend(prompts)
        vectors = embed(self.cache.encoder, joined, self.cache.batch_size).reshape(
            len(candidates), n, -1
        )
        return ((vectors * self.targets).sum(axis=-1) ** 3).mean(axis=1)


def candidate_moves(text, vocabulary, moves):
    words = text.split()
    for item in vocabulary:
        yield " ".join(words + [item])
        if moves == "edit":
            for i in range(len(words)):
                yield " ".join(words[:i] + [item] + words[i:])
                yield " ".join(words[:i] + [item] + words[i + 1 :])


def beam_search(
    objective, vocabulary, beam_width, steps, fits, moves="append", holdout=None, log=print
):
    """Returns (best string, history of per-step scores)."""
    beams, best_score, history = [""], -np.inf, []
    for step in range(1, steps + 1):
        candidates = {
            c for b in beams for c in candidate_moves(b, vocabulary, moves) if c not in beams
        }
        candidates = sorted(c for c in candidates if fits(c))
        if not candidates:
            log(f"mean-prompt: step {step}: no candidate fits the encoder's token limit; stop")
            break
        scores = objective(candidates)
        order = np.argsort(-scores, kind="stable")[:beam_width]
        if scores[order[0]] <= best_score:
            log(f"mean-prompt: step {step}: no gain; stop")
            break
        beams = [candidates[i] for i in order]
        best_score = float(scores[order[0]])
        entry = {"step": step, "train": best_score, "candidates": len(candidates), "best": beams[0]}
        if holdout is not None:
            entry["holdout"] = float(holdout([beams[0]])[0])
        history.append(entry)
        log(
            f"mean-prompt: step {step}: train {best_score:.4f}"
            + (f", holdout {entry['holdout']:.4f}" if holdout else "")
            + f", {len(candidates)} candidates: {beams[0]!r}"
        )
    return beams[0], history


def build_vocabulary(kind, targets, pieces, letters_only, top_fraction, objective):
    """Words of the targets or the encoder's pieces, filtered, best first."""
    if kind == "words":
        items = [w.strip(".,;:!?\"'()") for t in targets for w in t.split()]
    else:
        items = [p.replace("\u2581", "") for p in pieces]
    items = [w for w in dict.fromkeys(items) if w and (w.isalpha() or not letters_only)]
    if not items:
        return []
    scores = objective(items)
    keep = max(1, int(round(len(items) * top_fraction)))
    return [items[i] for i in np.argsort(-scores, kind="stable")[:keep]]


def configured_vocabulary(mean_prompt_cfg, targets, limit, objective):
    """`build_vocabulary` as `mean_prompt_cfg` says, for `targets`."""
    mc = mean_prompt_cfg
    pieces = limit.pieces() if mc.vocabulary == "pieces" else []
    return build_vocabulary(
        mc.vocabulary, targets, pieces, mc.letters_only, mc.top_fraction, objective
    )


def best_constant(cache, candidates, train_targets, holdout_targets):
    """The single candidate that scores best on the training targets, used
    for every row (picked like the mean prompt), and its holdout score."""
    candidates = list(dict.fromkeys(candidates))
    best = candidates[int(np.argmax(MeanScore(cache, train_targets)(candidates)))]
    return best, float(MeanScore(cache, holdout_targets)([best])[0])


def combined_objectives(cfg, cache, train_df, holdout_df, cut, log):
    """(the combined score on the first `combined_rows` training rows that
    have a model output, the same on the holdout rows that have one, or
    None)."""
    mc = cfg.mean_prompt
    if not mc.outputs:
        raise InputError(
            "mean_prompt.objective=combined needs mean_prompt.outputs: the model's outputs for "
            "training rows, e.g. make predict ARGS='predict.rows=all predict.out=predict_all', "
            "then mean_prompt.outputs=runs/<run.name>/predict_all/model_outputs.csv"
        )
    outputs = read_table(mc.outputs, SUBMISSION_COLUMNS, empty="keep", log=log).set_index("id")[
        "rewrite_prompt"
    ]
    train_df = train_df[train_df["id"].isin(outputs.index)].iloc[: mc.combined_rows]
    holdout_df = holdout_df[holdout_df["id"].isin(outputs.index)]
    if train_df.empty:
        raise InputError(
            f"mean_prompt.outputs {mc.outputs}: no output for any training row of "
            f"{RunDir(cfg).mean_prompt_targets}; predict the training rows (predict.rows=all)"
        )
    log(
        f"mean-prompt: combined objective: the string after the model's outputs, on "
        f"{len(train_df)} training / {len(holdout_df)} holdout rows of {mc.outputs}"
    )

    def score(part):
        return CombinedScore(
            cache, outputs.loc[part["id"]], part["rewrite_prompt"], cfg.predict, cut
        )

    return score(train_df), score(holdout_df) if len(holdout_df) else None


def search_clusters(cfg, cache, targets, limit, global_prompt, path, log):
    """One mean prompt per k-means cluster of the training targets, saved to
    `path`; returns the summary. The holdout score gives each holdout row
    its cluster by its true prompt: an upper bound, since predict picks by
    the model's output."""
    mc = cfg.mean_prompt
    train, holdout = targets
    labels, centroids = kmeans(cache(train), mc.clusters, mc.seed)
    prompts, details = [], []
    for c in range(mc.clusters):
        members = [t for t, label in zip(train, labels, strict=True) if label == c]
        objective = MeanScore(cache, members)
        vocabulary = configured_vocabulary(mc, members, limit, objective)
        best, history = beam_search(
            objective, vocabulary, mc.beam_width, mc.steps, limit, mc.moves, log=lambda _: None
        )
        best = best if history else global_prompt
        prompts.append(best)
        details.append({"targets": len(members), "train": float(objective([best])[0])})
        log(
            f"mean-prompt: cluster {c + 1}/{mc.clusters}: {len(members)} targets, train "
            f"{details[-1]['train']:.4f}: {best!r}"
        )
    clusters = MeanPromptClusters(centroids, prompts, global_prompt)
    clusters.save(path, details)
    summary = {"k": mc.clusters, "prompts": prompts}
    if holdout:
        truth = cache(holdout)
        chosen = cache(clusters.nearest(truth))
        summary["holdout_by_true_prompt"] = float(np.mean(np.sum(truth * chosen, axis=1) ** 3))
        log(
            f"mean-prompt: clusters' holdout {summary['holdout_by_true_prompt']:.4f} with each row "
            "in its true prompt's cluster (an upper bound: predict picks by the model output)"
        )
    return summary


@pushes_run
def run_mean_prompt_stage(cfg, log=print):
    run = RunDir(cfg)
    stage_dir = run.start_stage(cfg, cfg.mean_prompt.out)
    # No accelerator work: process 0 searches alone, the other hosts wait for it.
    return hosts.share_from_main(lambda: search_mean_prompt(cfg, run, stage_dir, log))


def search_mean_prompt(cfg, run, stage_dir, log):
    from pipeline.run import plots

    mc = cfg.mean_prompt
    columns = ["id", "rewrite_prompt"] if mc.objective == "combined" else ["rewrite_prompt"]
    df = read_table(run.mean_prompt_targets, columns, ["rewrite_prompt"], empty="keep", log=log)
    train_rows, _, holdout_rows = split_rows(len(df), cfg.split)
    df["rewrite_prompt"] = df["rewrite_prompt"].str.strip()
    train_df, holdout_df = (df.iloc[list(rows)] for rows in (train_rows, holdout_rows))
    train_df, holdout_df = (part[part["rewrite_prompt"] != ""] for part in (train_df, holdout_df))
    train, holdout = list(train_df["rewrite_prompt"]), list(holdout_df["rewrite_prompt"])
    limit = TokenLimit(find_piece_model(cfg.score.encoder, mc.piece_model), mc.max_tokens)
    cache = EmbeddingCache(load_sentence_encoder(cfg.score.encoder), mc.batch_size)
    if mc.objective == "combined":
        objective, holdout_score = combined_objectives(
            cfg, cache, train_df, holdout_df, limit.cut, log
        )
    else:
        objective, holdout_score = (
            MeanScore(cache, train),
            MeanScore(cache, holdout) if holdout else None,
        )
    vocabulary = configured_vocabulary(mc, train, limit, objective)
    log(
        f"mean-prompt: {len(train)} train / {len(holdout)} holdout targets, {len(vocabulary)} "
        f"{mc.vocabulary} in the vocabulary"
    )
    start = time.perf_counter()
    best, history = beam_search(
        objective, vocabulary, mc.beam_width, mc.steps, limit, mc.moves, holdout_score, log
    )
    elapsed = time.perf_counter() - start
    if not history:
        raise InputError(
            f"mean-prompt: no candidate could be scored ({len(vocabulary)} vocabulary items, "
            f"max_tokens={mc.max_tokens}); check mean_prompt.vocabulary, .letters_only and "
            ".top_fraction"
        )
    (stage_dir / "mean_prompt.txt").write_text(best + "\n")
    summary = {
        "mean_prompt": best,
        "objective": mc.objective,
        "steps": history,
        "seconds": round(elapsed, 2),
        "strings_embedded": cache.misses,
        "cache_hit_rate": round(cache.hit_rate, 4),
    }
    if holdout_score and mc.objective == "combined":
        alone = float(holdout_score([""])[0])  # an empty part is skipped: the output alone
        summary["model_outputs_alone"] = {"holdout": alone}
        log(
            f"mean-prompt: holdout {history[-1]['holdout']:.4f} vs the model outputs alone "
            f"{alone:.4f}"
        )
    elif holdout:
        constant, constant_score = best_constant(cache, train, train, holdout)
        summary["best_single_target_prompt"] = {"prompt": constant, "holdout": constant_score}
        log(
            f"mean-prompt: holdout {history[-1]['holdout']:.4f} vs best single target prompt "
            f"{constant_score:.4f} ({constant!r})"
        )
    if mc.clusters:
        summary["clusters"] = search_clusters(
            cfg, cache, (train, holdout), limit, best, run.mean_prompt_clusters, log
        )
    else:
        run.mean_prompt_clusters.unlink(missing_ok=True)  # a former run's, not this one's
    (stage_dir / "search.json").write_text(json.dumps(summary, indent=2))
    plots.search_curve(history, stage_dir / "search.png")
    log(f"mean-prompt: {best!r} -> {run.mean_prompt}")
    return best
