import numpy as np
import pandas as pd
import pytest

from pipeline.recovery import RecoveryFormatter, share_budget
from pipeline.templates import (
    CHAT_TURN,
    RECOVERY_TEMPLATE,
    REWRITE_TEMPLATE,
    format_recovery,
    format_rewrite_request,
)


def test_rewrite_request_is_one_gemma_user_turn():
    text = format_rewrite_request(REWRITE_TEMPLATE, "Make it rhyme.", "A cat sat.")
    assert text == (
        "<start_of_turn>user\nInstruction:\nMake it rhyme.\n\nOriginal Text:\nA cat sat.\n\n"
        "Response:\n<end_of_turn>\n<start_of_turn>model\n"
    )
    assert CHAT_TURN.count("{content}") == 1


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


def _one_example(formatter, original, rewritten, prompt):
    df = pd.DataFrame({"original_text": [original], "rewritten_text": [rewritten], "rewrite_prompt": [prompt]})
    x, y, w = next(iter(formatter.training_dataset(df, batch_size=1)))
    return {k: v.numpy()[0] for k, v in x.items()}, y.numpy()[0], w.numpy()[0]


def test_loss_weights_cover_the_response_and_eos_only(tiny_model):
    formatter = _formatter(tiny_model)
    tok = formatter.tokenizer
    x, y, w = _one_example(formatter, "The cat sat.", "THE CAT SAT.", "Convert this text into all capital letters.")
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
    prompt = formatter.prompt_ids(pd.DataFrame({"original_text": ["The cat sat."], "rewritten_text": ["THE CAT SAT."]}))[0]
    assert list(x["token_ids"][: len(prompt)]) == prompt  # predict sees the same prompt tokens


def test_long_texts_are_cut_to_fit_and_counted(tiny_model):
    formatter = _formatter(tiny_model, sequence_length=100, response=16)
    long = "word " * 400
    df = pd.DataFrame({"original_text": [long, "short"], "rewritten_text": [long, "tiny"], "rewrite_prompt": ["p", "q"]})
    fitted, cut = formatter.fit_texts(df)
    assert cut == 1 and fitted["original_text"][1] == "short"
    x, y, w = next(iter(formatter.training_dataset(fitted, batch_size=2)))
    assert x["token_ids"].shape == (2, 100)
    assert w.numpy()[0].sum() > 0  # the answer survived the cut
    assert all(len(p) <= 100 - 16 for p in formatter.prompt_ids(fitted))


def test_validation_batches_padded_with_zero_weight_rows(tiny_model):
    formatter = _formatter(tiny_model)
    df = pd.DataFrame({"original_text": ["a b c"] * 3, "rewritten_text": ["A B C"] * 3, "rewrite_prompt": ["Upper."] * 3})
    batches = list(formatter.training_dataset(df, batch_size=2, pad_to_batch=True))
    assert len(batches) == 2
    assert batches[1][2].numpy()[1].sum() == 0 and batches[1][2].numpy()[0].sum() > 0


def test_shuffle_is_seeded(tiny_model):
    formatter = _formatter(tiny_model)
    df = pd.DataFrame({"original_text": [f"text {i}" for i in range(8)], "rewritten_text": ["x"] * 8, "rewrite_prompt": ["p"] * 8})
    first = [b[0]["token_ids"].numpy() for b in formatter.training_dataset(df, 4, shuffle_seed=3)]
    again = [b[0]["token_ids"].numpy() for b in formatter.training_dataset(df, 4, shuffle_seed=3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize(
    "lengths, kept", [((10, 10), (10, 90)), ((300, 20), (80, 20)), ((300, 300), (50, 50)), ((30, 300), (30, 70))]
)
def test_budget_sharing(lengths, kept):
    assert share_budget(*lengths, 100) == kept


def _mixed_lengths(n=48, seed=0):
    rng = np.random.default_rng(seed)
    words = ["cat", "sat", "dog", "ran", "sun", "sea"]
    text = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
    return pd.DataFrame(
        {"original_text": [text(int(rng.integers(2, 60))) for _ in range(n)],
         "rewritten_text": [text(int(rng.integers(2, 60))) for _ in range(n)],
         "rewrite_prompt": [text(int(rng.integers(2, 8))) for _ in range(n)]}
    )


def test_length_buckets_cut_padding_with_a_fixed_set_of_shapes(tiny_model):
    from pipeline.recovery import count_tokens

    formatter = _formatter(tiny_model, sequence_length=256, response=32)
    df, _ = formatter.fit_texts(_mixed_lengths())
    batches_fixed, real_fixed, computed_fixed = count_tokens(formatter.training_dataset(df, 4))
    bucketed = list(formatter.training_dataset(df, 4, length_step=32))
    real = sum(int(x["padding_mask"].numpy().sum()) for x, _, _ in bucketed)
    computed = sum(int(np.prod(x["token_ids"].shape)) for x, _, _ in bucketed)
    assert computed_fixed == batches_fixed * 4 * 256  # without buckets every row is padded to 256
    assert real / computed > 0.85 > real_fixed / computed_fixed
    lengths = {x["token_ids"].shape[1] for x, _, _ in bucketed}
    assert lengths <= set(range(32, 257, 32))  # shapes from a fixed set
    for x, y, w in bucketed:  # the loss still covers the answers only
        mask = x["padding_mask"].numpy()
        assert x["token_ids"].shape[0] == 4
        assert (w.numpy()[~mask] == 0).all() and (w.numpy().sum(axis=1) > 0).all()
        assert mask[:, 0].all() and (x["token_ids"].numpy()[~mask] == formatter.tokenizer.pad_token_id).all()


def test_same_row_same_tokens_in_any_bucket(tiny_model):
    formatter = _formatter(tiny_model)
    df = pd.DataFrame({"original_text": ["The cat sat."], "rewritten_text": ["THE CAT SAT."], "rewrite_prompt": ["Upper."]})
    (x1, y1, w1), = list(formatter.training_dataset(df, 1))
    (x2, y2, w2), = list(formatter.training_dataset(df, 1, length_step=32))
    n = x2["token_ids"].shape[1]
    assert n < x1["token_ids"].shape[1] and n % 32 == 0
    assert (x1["token_ids"].numpy()[:, :n] == x2["token_ids"].numpy()).all()
    assert (w1.numpy()[:, :n] == w2.numpy()).all() and w1.numpy()[:, n:].sum() == 0
