"""The data stage: rewrite source chunks with sampled prompts.

Plan: chunks of the source texts, each paired with `prompts_per_chunk`
prompts drawn (seeded) from the pool, up to `max_rows` rows with stable ids.
Rewrite: the instruct model (batched, chat format) or, for the offline demo,
the rules in `rules.py`. Each finished batch is written to a file of its
own in `rewrites.partial/` (atomically: written beside, then renamed; on a
bucket run also sent up at once, an object per batch, since objects cannot
be appended to), so a rerun after a crash or a preemption notice (SIGTERM:
the stage stops after the batch at hand, exit code 75) generates only the
rows not written yet; at the end `rewrites.csv` holds every planned row
once, in plan order: `id, original_text, rewrite_prompt, rewritten_text`.

Example:
```python
cfg = load_config("configs/cpu_tiny.yaml")
csv_path = run_data_stage(cfg)
```
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import InputError, MissingInputError
from pipeline.parallel import hosts, preemption
from pipeline.run.run_dir import RunDir, pushes_run
from pipeline.text import rules, templates
from pipeline.text.sources import chunk_texts, read_sources
from pipeline.text.tables import TRAIN_COLUMNS, write_table


def read_prompt_pool(path):
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"data.prompts: {path} not found")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputError(f"data.prompts: {path} holds no prompt (one per line)")
    return prompts


def plan_rows(data_cfg, log=print):
    """The rows to generate: DataFrame(id, original_text, rewrite_prompt)."""
    chunks, dropped = chunk_texts(
        read_sources(data_cfg.sources), data_cfg.chunk_words, data_cfg.min_chars
    )
    log(f"data: {len(chunks)} chunks kept, dropped: {dict(dropped) or 'none'}")
    if not chunks:
        raise InputError(
            f"data.sources: no text chunk kept (dropped: {dict(dropped) or 'none'}); check that "
            "the "
            "files hold texts, and data.min_chars"
        )
    prompts = read_prompt_pool(data_cfg.prompts)
    per_chunk = min(data_cfg.prompts_per_chunk, len(prompts))
    rng = np.random.default_rng(data_cfg.seed)
    rows = []
    for c, chunk in enumerate(chunks):
        for k, p in enumerate(rng.choice(len(prompts), size=per_chunk, replace=False)):
            rows.append((f"c{c:05d}p{k}", chunk, prompts[p]))
    # Shuffle so the contiguous train/validation/holdout split mixes sources.
    rows = [rows[i] for i in rng.permutation(len(rows))][: data_cfg.max_rows]
    return pd.DataFrame(rows, columns=["id", "original_text", "rewrite_prompt"])


@pushes_run
def run_data_stage(cfg, log=print):
    run = RunDir(cfg)
    stage_dir = run.start_stage(cfg, cfg.data.out)
    partial = stage_dir / "rewrites.partial"

    def plan_and_resume():
        plan = plan_rows(cfg.data, log)
        _check_plan_unchanged(stage_dir / "plan.json", plan, cfg, partial)
        run.push(stage_dir / "plan.json")
        return plan, set(_read_partial(partial, set(plan["id"]), log))

    # Process 0 plans and reads what is done; every host gets the same.
    plan, done = hosts.share_from_main(plan_and_resume)
    todo = ~plan["id"].isin(done).to_numpy()
    log(
        f"data: {len(plan)} rows planned, {len(done)} already written, {int(todo.sum())} to rewrite"
    )
    if todo.any():
        written = int((~todo).sum())
        with preemption.watching() as notice:
            for number, batch in enumerate(_rewrite(cfg, plan, todo, log), start=1):
                if hosts.is_main_process():
                    run.push(_write_batch(partial, batch))
                written += len(batch)
                if notice.reached(number):
                    raise preemption.Preempted(
                        f"data: preempted with {written}/{len(plan)} rows written to {partial}; "
                        "rerun the "
                        "stage to rewrite the rest"
                    )
    if not hosts.is_main_process():
        return run.data_csv
    rewritten = _read_partial(partial, set(plan["id"]), log)
    out = plan.assign(rewritten_text=plan["id"].map(rewritten))[TRAIN_COLUMNS]
    empty = int((out["rewritten_text"].str.strip() == "").sum())
    if empty:
        log(f"data: {empty} rewrite(s) came back empty (kept; finetune drops them)")
    write_table(out, run.data_csv)
    log(f"data: wrote {len(out)} rows -> {run.data_csv}")
    return run.data_csv


def _rewrite(cfg, plan, todo, log):
    """Yields lists of {'id', 'rewritten_text'} of the rows still to do, as
    batches finish."""
    if cfg.data.rewriter == "rules":
        # No accelerator work: process 0 rewrites, the other hosts wait for it.
        rows = hosts.share_from_main(
            lambda: [
                {"id": r.id, "rewritten_text": rules.rewrite(r.rewrite_prompt, r.original_text)}
                for r in plan[todo].itertuples()
            ]
        )
        for start in range(0, len(rows), cfg.data.batch_size):
            yield rows[start : start + cfg.data.batch_size]
        return
    from pipeline.models.generation import BatchedGenerator
    from pipeline.models.model import load_model
    from pipeline.text.tokens import tokenize_batch

    causal_lm, tokenizer = load_model(cfg, [cfg.data.batch_size])
    chat_turn = _chat_turn(cfg)
    requests = [
        templates.format_rewrite_request(
            cfg.data.template, r.rewrite_prompt, r.original_text, chat_turn
        )
        for r in plan.itertuples()
    ]
    # The chat-format string starts the turn; the start token (<bos>) comes first.
    prompts = tokenize_batch(tokenizer, requests, add_bos=True)
    stops = (
        None if cfg.data.chat_format else [tokenizer.end_token_id]
    )  # the reference stopped at <eos> only
    generator = BatchedGenerator(
        causal_lm, tokenizer, cfg.data.batch_size, cfg.data.max_new_tokens, log=log, stops=stops
    )
    # Batches are planned over all rows, so a resumed row is decoded in the
    # same batch as in an uninterrupted run; only unfinished batches run.
    for indices, texts in generator.generate(prompts, skip=lambda indices: not todo[indices].any()):
        yield [
            {"id": plan.id[i], "rewritten_text": t.strip()}
            for i, t in zip(indices, texts, strict=True)
            if todo[i]
        ]
    if generator.rows_at_limit:
        log(
            f"data: {generator.rows_at_limit} rewrite(s) reached "
            f"data.max_new_tokens={cfg.data.max_new_tokens} "
            "and were cut there; raise it to keep them whole"
        )


def _chat_turn(cfg):
    """The model family's chat turn, or None for the bare template."""
    from pipeline.models.model import read_model_spec

    return read_model_spec(cfg.model.preset).family.chat_turn if cfg.data.chat_format else None


def _check_plan_unchanged(plan_path, plan, cfg, partial):
    """Finished batches only resume the setup they were written with: the
    plan, and everything that changes how a row is rewritten."""
    data = cfg.data
    setup = [data.template, data.rewriter]
    if data.rewriter == "model":
        setup += [
            _chat_turn(cfg),
            cfg.model.preset,
            cfg.model.dtype,
            data.max_new_tokens,
            data.batch_size,
        ]
    digest = hashlib.sha256(
        pd.util.hash_pandas_object(plan, index=False).values.tobytes() + json.dumps(setup).encode()
    ).hexdigest()
    if plan_path.exists() and partial.exists():
        if json.loads(plan_path.read_text())["digest"] != digest:
            raise InputError(
                f"{partial} was written for another plan or setup (sources, prompts, chunking, "
                "seed, template, chat format, rewriter, model, dtype, max_new_tokens or batch size "
                "changed); delete "
                "it to start over, or use another run.name"
            )
    plan_path.write_text(json.dumps({"digest": digest, "rows": len(plan)}))


def _write_batch(partial, batch):
    """Writes one finished batch of {'id', 'rewritten_text'} rows into its
    own file in the folder `partial` (beside, then renamed: a kill leaves
    the whole file or none); returns the file."""
    partial.mkdir(parents=True, exist_ok=True)
    path = partial / f"{batch[0]['id']}.jsonl"
    part = path.with_name(path.name + ".part")
    part.write_text("".join(json.dumps(row) + "\n" for row in batch), encoding="utf-8")
    os.replace(part, path)
    return path


def _read_partial(partial, planned_ids, log):
    """id -> rewritten_text of the rows in the finished batches' files."""
    done = {}
    for path in sorted(partial.glob("*.jsonl")) if partial.exists() else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["id"] not in planned_ids:
                raise InputError(
                    f"{path}: row {row['id']!r} is not in the plan; delete {partial} to start over"
                )
            done[row["id"]] = row["rewritten_text"]
    return done
