import numpy as np
import pandas as pd
import pytest

from pipeline.models.families.gemma import CHAT_TURN
from pipeline.text.batching import Batch, TrainingBatches, evaluation_batches
from pipeline.text.recovery import RecoveryFormatter, share_budget
from pipeline.text.templates import (
    RECOVERY_TEMPLATE,
    REWRITE_TEMPLATE,
    format_recovery,
    format_rewrite_request,
)


def test_rewrite_request_is_one_gemma_user_turn():
    text = format_rewrite_request(REWRITE_TEMPLATE, "Make it rhyme.", "A cat sat.", CHAT_TURN)
    assert text == (
        "<start_of_turn>user\nInstruction:\nMake it rhyme.\n\nOriginal Text:\nA cat sat.\n\n"
        "Response:\n<end_of_turn>\n<start_of_turn>model\n"
    )
    assert CHAT_TURN.count("{content}") == 1
    bare = format_rewrite_request(REWRITE_TEMPLATE, "Make it rhyme.", "A cat sat.")
    assert (
        bare == "Instruction:\nMake it rhyme.\n\nOriginal Text:\nA cat sat.\n\nResponse:\n"
    )  # the reference's


def test_recovery_prompt_ends_where_the_answer_starts():
    text = format_recovery(RECOVERY_TEMPLATE, "orig {braces}", "new")
    assert "### Original Text:\norig {braces}\n\n### Rewritten Text:\nnew\n\n" in text
    assert text.endswith("### Response:\n")


SHORT_TEMPLATE = "Original:\n{original_text}\nRewritten:\n{rewritten_text}\nPrompt:\n"


def _formatter(tiny_model, sequence_length=128, response=32):
    _, tokenizer = tiny_model
    return RecoveryFormatter(tokenizer, SHORT_TEMPLATE, sequence_length, response)


def test_too_short_sequence_is_refused(tiny_model):
    with pytest.raises(ValueError, match="train.sequence_length=256 leaves"):
        RecoveryFormatter(tiny_model[1], RECOVERY_TEMPLATE, 256, 16)


def _one_example(formatter, original, rewritten, prompt, length=None):
    df = pd.DataFrame(
        {"original_text": [original], "rewritten_text": [rewritten], "rewrite_prompt": [prompt]}
    )
    rows, _ = formatter.encode(df)
    x, y, w = rows.arrays(Batch((0,), length or formatter.sequence_length))
    return {k: v[0] for k, v in x.items()}, y[0], w[0]


def test_loss_weights_cover_the_response_and_eos_only(tiny_model):
    formatter = _formatter(tiny_model)
    tok = formatter.tokenizer
    x, y, w = _one_example(
        formatter, "The cat sat.", "THE CAT SAT.", "Convert this text into all capital letters."
    )
    answer = [int(t) for t in tok("Convert this text into all capital letters.")]
    assert list(y[w == 1]) == answer + [tok.end_token_id]
    n_real = int(x["padding_mask"].sum())
    # Everything before the answer (bos + prompt) and all padding weigh 0.
    # Inputs end with <eos> (its target is padding); targets end with <eos>.
    first_answer = n_real - 1 - (len(answer) + 1)
    assert w[:first_answer].sum() == 0 and w[n_real - 1 :].sum() == 0
    assert (w[first_answer : n_real - 1] == 1).all()
    assert x["token_ids"][0] == tok.start_token_id
    assert (x["token_ids"][n_real:] == tok.pad_token_id).all()
    # Targets are the inputs shifted by one.
    assert (y[: n_real - 1] == x["token_ids"][1:n_real]).all()
    prompt = formatter.prompt_ids(
        pd.DataFrame({"original_text": ["The cat sat."], "rewritten_text": ["THE CAT SAT."]})
    )[0]
    assert list(x["token_ids"][: len(prompt)]) == prompt  # predict sees the same prompt tokens


def test_long_texts_are_cut_to_fit_and_counted(tiny_model):
    formatter = _formatter(tiny_model, sequence_length=100, response=16)
    long = "word " * 400
    df = pd.DataFrame(
        {
            "original_text": [long, "short"],
            "rewritten_text": [long, "tiny"],
            "rewrite_prompt": [long, "q"],
        }
    )
    fitted, cut = formatter.fit_texts(df)
    assert cut == 1 and fitted["original_text"][1] == "short"
    rows, responses_cut = formatter.encode(fitted)
    assert responses_cut == 1  # the 400-word answer is cut to max_response_tokens
    assert all(len(ids) <= 100 for ids in rows.ids)
    x, y, w = rows.arrays(Batch((0, 1), 100))
    assert x["token_ids"].shape == (2, 100)
    assert w[0].sum() > 0  # the cut answer still trains
    assert all(len(p) <= 100 - 16 for p in formatter.prompt_ids(fitted))


def test_evaluation_batches_cover_every_row_once_with_zero_weight_fillers(tiny_model):
    formatter = _formatter(tiny_model)
    df = pd.DataFrame(
        {
            "original_text": ["a b c"] * 3,
            "rewritten_text": ["A B C"] * 3,
            "rewrite_prompt": ["Upper."] * 3,
        }
    )
    rows, _ = formatter.encode(df)
    batches = evaluation_batches(rows, 2, 128, 32)
    assert [b.rows for b in batches] == [(0, 1), (2, -1)]
    _, _, w = rows.arrays(batches[1])
    assert w[1].sum() == 0 and w[0].sum() > 0


@pytest.mark.parametrize(
    "lengths, kept",
    [((10, 10), (10, 90)), ((300, 20), (80, 20)), ((300, 300), (50, 50)), ((30, 300), (30, 70))],
)
def test_budget_sharing(lengths, kept):
    assert share_budget(*lengths, 100) == kept


def _mixed_lengths(n=48, seed=0):
    rng = np.random.default_rng(seed)
    words = ["cat", "sat", "dog", "ran", "sun", "sea"]
    text = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
    return pd.DataFrame(
        {
            "original_text": [text(int(rng.integers(2, 60))) for _ in range(n)],
            "rewritten_text": [text(int(rng.integers(2, 60))) for _ in range(n)],
            "rewrite_prompt": [text(int(rng.integers(2, 8))) for _ in range(n)],
        }
    )


def test_batch_plan_is_seeded_shuffled_per_epoch_and_covers_every_row(tiny_model):
    formatter = _formatter(tiny_model, sequence_length=256, response=32)
    df, _ = formatter.fit_texts(_mixed_lengths())
    rows, _ = formatter.encode(df)
    plan = TrainingBatches(rows, 4, 256, 32, seed=3)
    epochs = [plan.epoch(e) for e in range(3)]
    assert plan.epoch(0) == TrainingBatches(rows, 4, 256, 32, seed=3).epoch(0)  # seeded
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    assert plan.epoch(0) != TrainingBatches(rows, 4, 256, 32, seed=4).epoch(0)
    for batches in epochs:
        assert len(batches) == plan.steps_per_epoch
        trained = sorted(r for b in batches for r in b.rows if r >= 0)
        assert trained == list(range(len(rows)))  # every row once per epoch
        assert sum(r < 0 for b in batches for r in b.rows) < 4  # fillers only in one batch


def test_length_buckets_cut_padding_with_a_fixed_set_of_shapes(tiny_model):
    formatter = _formatter(tiny_model, sequence_length=256, response=32)
    df, _ = formatter.fit_texts(_mixed_lengths())
    rows, _ = formatter.encode(df)
    fixed = TrainingBatches(rows, 4, 256, 0, seed=0)
    bucketed = TrainingBatches(rows, 4, 256, 32, seed=0)
    assert (
        fixed.computed_tokens == fixed.steps_per_epoch * 4 * 256
    )  # without buckets every row is padded to 256
    assert (
        bucketed.real_tokens / bucketed.computed_tokens
        > 0.85
        > fixed.real_tokens / fixed.computed_tokens
    )
    assert {b.length for b in bucketed.epoch(0)} <= set(
        range(32, 257, 32)
    )  # shapes from a fixed set
    for batch in bucketed.epoch(0):  # the loss still covers the answers only
        x, _, w = rows.arrays(batch)
        mask = x["padding_mask"]
        assert x["token_ids"].shape == (4, batch.length)
        real = np.array([r >= 0 for r in batch.rows])
        assert (w[~mask] == 0).all() and (w[real].sum(axis=1) > 0).all() and w[~real].sum() == 0
        assert (
            mask[real, 0].all()
            and (x["token_ids"][~mask] == formatter.tokenizer.pad_token_id).all()
        )


def test_same_row_same_tokens_in_any_bucket(tiny_model):
    formatter = _formatter(tiny_model)
    columns = ["original_text", "rewritten_text", "rewrite_prompt"]
    args = ("The cat sat.", "THE CAT SAT.", "Upper.")
    x1, y1, w1 = _one_example(formatter, *args)
    rows, _ = formatter.encode(pd.DataFrame([args], columns=columns))
    n = TrainingBatches(rows, 1, 128, 32, 0).lengths[0]
    x2, y2, w2 = _one_example(formatter, *args, length=n)
    assert n < x1["token_ids"].shape[0] and n % 32 == 0
    assert (x1["token_ids"][:n] == x2["token_ids"]).all()
    assert (w1[:n] == w2).all() and w1[n:].sum() == 0
