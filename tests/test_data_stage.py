import json

import pandas as pd
import pytest

from pipeline.run.config import SourceConfig
from pipeline.stages.data import plan_rows, run_data_stage
from pipeline.text.rules import RULES, rewrite
from pipeline.text.sources import chunk_texts, read_sources
from pipeline.text.tables import TRAIN_COLUMNS


def test_chunking_filters_like_the_reference():
    texts = ["word " * 100, "== Heading == " + "x " * 40, "short one", "caf\u00e9 " * 30]
    chunks, dropped = chunk_texts(texts, chunk_words=40, min_chars=50)
    assert [len(c.split()) for c in chunks] == [40, 40, 20]
    assert dropped == {"wiki markup": 1, "too short": 2, "non-ASCII": 1}


def test_sources_txt_csv_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first para\n\nsecond para\n")
    pd.DataFrame({"text": ["from csv"]}).to_csv(tmp_path / "b.csv", index=False)
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "from jsonl"}) + "\n")
    texts = read_sources(
        [
            SourceConfig(str(tmp_path / "a.txt")),
            SourceConfig(str(tmp_path / "b.csv"), "text"),
            SourceConfig(str(tmp_path / "c.jsonl"), "body"),
        ]
    )
    assert texts == ["first para", "second para", "from csv", "from jsonl"]
    with pytest.raises(ValueError, match="b.csv: missing column 'missing'"):
        read_sources([SourceConfig(str(tmp_path / "b.csv"), "missing")])
    (tmp_path / "header_only.csv").write_text("text\n")
    with pytest.raises(ValueError, match="header_only.csv: a header \\(text\\) and no rows"):
        read_sources([SourceConfig(str(tmp_path / "header_only.csv"), "text")])


def test_sources_without_a_usable_chunk_stop_the_plan(tiny_cfg, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    tiny_cfg.data.sources = [SourceConfig(str(tmp_path / "empty.txt"))]
    with pytest.raises(ValueError, match="data.sources: no text chunk kept"):
        plan_rows(tiny_cfg.data, log=lambda *_: None)
    (tmp_path / "empty_pool.txt").write_text("# only a comment\n\n")
    tiny_cfg.data.sources, tiny_cfg.data.prompts = (
        [SourceConfig("demo/texts.txt")],
        str(tmp_path / "empty_pool.txt"),
    )
    with pytest.raises(ValueError, match="empty_pool.txt holds no prompt"):
        plan_rows(tiny_cfg.data, log=lambda *_: None)


def test_plan_is_seeded_and_pairs_distinct_prompts(tiny_cfg):
    a, b = (
        plan_rows(tiny_cfg.data, log=lambda *_: None),
        plan_rows(tiny_cfg.data, log=lambda *_: None),
    )
    assert a.equals(b) and a["id"].is_unique
    per_chunk = a.groupby("original_text")["rewrite_prompt"].agg(lambda p: p.is_unique)
    assert per_chunk.all() and set(a["rewrite_prompt"]) <= set(RULES)


def test_rules_leave_a_trace():
    text = "The cat sat. The dog ran."
    assert (
        rewrite("Convert this text into all capital letters.", text) == "THE CAT SAT. THE DOG RAN."
    )
    assert (
        rewrite("Reverse the order of the sentences in this text.", text)
        == "The dog ran. The cat sat."
    )
    with pytest.raises(ValueError, match="no rewrite rule"):
        rewrite("Unknown prompt.", text)


def test_rerun_resumes_without_loss_or_duplicates(tiny_cfg):
    logs = []
    csv_path = run_data_stage(tiny_cfg, log=logs.append)
    full = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    assert list(full.columns) == TRAIN_COLUMNS and full["id"].is_unique
    partial = csv_path.parent / "rewrites.partial"
    batches = sorted(partial.glob("*.jsonl"))
    assert len(batches) == -(-len(full) // tiny_cfg.data.batch_size)  # a file per batch
    # A crash: the final CSV never written, the last batches not finished
    # (one of them left half written beside its name).
    csv_path.unlink()
    for path in batches[3:]:
        path.unlink()
    (partial / "c99999p0.jsonl.part").write_text('{"id": "c00000p0", "rewr')
    kept = sum(len(path.read_text().splitlines()) for path in batches[:3])
    logs.clear()
    run_data_stage(tiny_cfg, log=logs.append)
    assert f"{kept} already written, {len(full) - kept} to rewrite" in " ".join(logs)
    again = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    assert again.equals(full)
    assert sum(len(path.read_text().splitlines()) for path in partial.glob("*.jsonl")) == len(full)


def test_resume_refuses_a_changed_plan(tiny_cfg):
    run_data_stage(tiny_cfg, log=lambda *_: None)
    tiny_cfg.data.seed = 1
    with pytest.raises(ValueError, match="written for another plan"):
        run_data_stage(tiny_cfg, log=lambda *_: None)


def test_resume_refuses_a_changed_model_setup(tiny_cfg):
    tiny_cfg.data.rewriter, tiny_cfg.data.max_rows, tiny_cfg.data.max_new_tokens = "model", 4, 4
    tiny_cfg.data.prompts = "prompts/rewrite_prompts.txt"
    logs = []
    run_data_stage(tiny_cfg, log=logs.append)
    assert any(
        "rewrite(s) reached data.max_new_tokens=4" in line for line in logs
    )  # the tiny model rambles on
    tiny_cfg.data.max_new_tokens = 5
    with pytest.raises(ValueError, match="written for another plan or setup"):
        run_data_stage(tiny_cfg, log=lambda *_: None)


def test_reference_format_sends_the_bare_template_and_stops_at_eos_only(tiny_cfg, monkeypatch):
    from pipeline.models import generation

    seen = {}
    real_generate = generation.BatchedGenerator.generate

    def spy(self, prompts, skip=None):
        seen["stops"], seen["eos"] = self.stops, self.tokenizer.end_token_id
        seen["first"] = self.tokenizer.detokenize([prompts[0][1:]])
        return real_generate(self, prompts, skip)

    monkeypatch.setattr(generation.BatchedGenerator, "generate", spy)
    tiny_cfg.data.rewriter, tiny_cfg.data.max_rows, tiny_cfg.data.max_new_tokens = "model", 2, 2
    tiny_cfg.data.prompts, tiny_cfg.data.chat_format = "prompts/rewrite_prompts.txt", False
    run_data_stage(tiny_cfg, log=lambda *_: None)
    first = seen["first"][0]
    first = first.decode() if isinstance(first, bytes) else str(first)
    assert first.startswith("Instruction:\n") and "<start_of_turn>" not in first
    assert seen["stops"] == [seen["eos"]]  # not <end_of_turn>


def test_model_rewriter_generates_only_missing_rows(tiny_cfg):
    tiny_cfg.data.rewriter = "model"
    tiny_cfg.data.max_rows = 12
    tiny_cfg.data.max_new_tokens = 8
    tiny_cfg.data.prompts = "prompts/rewrite_prompts.txt"
    logs = []
    csv_path = run_data_stage(tiny_cfg, log=logs.append)
    first = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    assert len(first) == 12 and first["id"].is_unique
    assert sum("generate: 12/12 rows" in line for line in logs) == 1
    partial = csv_path.parent / "rewrites.partial"
    full_batch = keep_rows(partial, 8)  # the batch of 8 kept, the batch of 4 lost
    logs.clear()
    run_data_stage(tiny_cfg, log=logs.append)
    assert any("generate: 4/4 rows" in line for line in logs)
    second = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    assert list(second["id"]) == list(first["id"])
    # A batch cut short (5 of its 8 rows written): its other rows are decoded
    # again, in the same batch, and the CSV is the uninterrupted run's.
    whole = csv_path.read_bytes()
    keep_rows(partial, 8)
    full_batch.write_text("".join(full_batch.read_text().splitlines(keepends=True)[:5]))
    run_data_stage(tiny_cfg, log=logs.append)
    assert csv_path.read_bytes() == whole


def keep_rows(partial, n):
    """Leaves only the batch file of `n` rows; returns it."""
    (kept,) = [path for path in partial.glob("*.jsonl") if len(path.read_text().splitlines()) == n]
    for path in partial.glob("*.jsonl"):
        if path != kept:
            path.unlink()
    return kept
