"""The predict stage: competition CSV in, submission.csv out.

Reads `id, original_text, rewritten_text` (extra columns are ignored), loads
the base model and the adapter, generates the recovered prompts in length
buckets, and writes `submission.csv` (`id, rewrite_prompt`) in input order,
one row per id. An empty output would make the competition scorer fail, so
it is replaced by `predict.fallback` and counted.

Example:
```python
cfg = load_config("configs/kaggle_tpu_v3_8.yaml", ["predict.input=test.csv"])
submission_path = run_predict_stage(cfg)
```
"""

import json
import time

import pandas as pd

from pipeline.models.generation import BatchedGenerator
from pipeline.models.model import load_adapter, load_model, recovery_format
from pipeline.parallel import hosts
from pipeline.run.run_dir import RunDir, pushes_run
from pipeline.text.clusters import MeanPromptClusters
from pipeline.text.combine import combine_parts, load_parts
from pipeline.text.encoder import encoder_token_limit, load_sentence_encoder
from pipeline.text.openings import join_answers, opening_answers
from pipeline.text.recovery import RecoveryFormatter
from pipeline.text.tables import write_table


@pushes_run
def run_predict_stage(cfg, log=print):
    run = RunDir(cfg)
    stage_dir = run.start_stage(cfg, cfg.predict.out)
    combined = cfg.predict.combine != ["model"]

    def read_inputs():
        df = run.read_predict_rows(log)
        parts = load_parts(cfg.predict.combine, df["id"], run.mean_prompt, run.mean_prompt_clusters)
        if combined:
            encoder_token_limit(cfg)  # a missing piece model fails now, before any generation
        return df, parts

    # Process 0 reads the inputs (its files are the ones that count); every host gets them.
    df, parts = hosts.share_from_main(read_inputs)
    log(f"predict: {len(df)} rows from {run.predict_input} (rows: {cfg.predict.rows})")
    causal_lm, tokenizer = load_model(cfg, [cfg.predict.batch_size])
    adapter = run.predict_adapter
    how, trained = load_adapter(causal_lm, adapter, cfg.model.preset) if adapter else (None, {})
    log(f"predict: adapter {adapter} ({how})" if adapter else "predict: adapter none (base model)")
    recovery = recovery_format(trained, cfg.train, lambda line: log(f"predict: {line}"))
    formatter = RecoveryFormatter(tokenizer, *recovery)
    df, n_cut = formatter.fit_texts(df)
    generator = BatchedGenerator(
        causal_lm, tokenizer, cfg.predict.batch_size, cfg.predict.max_new_tokens, log=log
    )
    openings = cfg.predict.openings
    if openings:
        log(f"predict: one generation per opening: {' | '.join(openings)}")
    start = time.perf_counter()
    answers = opening_answers(formatter.prompt_ids(df), openings, tokenizer, generator.texts)
    outputs = join_answers(answers, cfg.predict.separator)
    elapsed = time.perf_counter() - start
    if not hosts.is_main_process():
        return run.submission
    cut = encoder_token_limit(cfg) if combined else None
    filled = {"model": outputs}
    if "clustered_mean_prompt" in cfg.predict.combine:  # by each row's model output
        filled["clustered_mean_prompt"] = MeanPromptClusters.load(
            run.mean_prompt_clusters
        ).for_outputs(load_sentence_encoder(cfg.score.encoder), outputs, cfg.score.batch_size)
    parts = [
        filled[name] if part is None else part
        for name, part in zip(cfg.predict.combine, parts, strict=True)
    ]
    prompts, fallbacks = combine_parts(parts, cfg.predict.separator, cfg.predict.fallback, cut)
    submission = pd.DataFrame({"id": df["id"], "rewrite_prompt": prompts})
    write_table(pd.DataFrame({"id": df["id"], "rewrite_prompt": outputs}), run.raw_outputs)
    if openings:  # each opening's answers, for compare
        by_opening = pd.DataFrame({"id": df["id"], **dict(zip(openings, answers, strict=True))})
        write_table(by_opening, run.outputs_by_opening)
    else:
        run.outputs_by_opening.unlink(missing_ok=True)  # a former run's
    write_table(submission, run.submission)
    summary = {
        "rows": len(df),
        "texts_cut_to_fit": n_cut,
        "combine": cfg.predict.combine,
        "openings": openings,
        "empty_predictions_replaced_by_fallback": fallbacks,
        "outputs_cut_at_max_new_tokens": generator.rows_at_limit,
        "seconds": round(elapsed, 2),
        "rows_per_second": round(len(df) / elapsed, 3) if elapsed else None,
        "compiled_shapes": sorted(generator.programs),
        "processes": hosts.process_count(),
        "adapter": str(adapter) if adapter else None,
    }
    (stage_dir / "predict_log.json").write_text(json.dumps(summary, indent=2))
    log(
        f"predict: {len(df)} rows in {elapsed:.1f}s, {n_cut} text(s) cut to fit, "
        f"{generator.rows_at_limit} output(s) cut at predict.max_new_tokens, "
        f"{fallbacks} empty prediction(s) replaced by the fallback -> {run.submission}"
    )
    return run.submission
