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
