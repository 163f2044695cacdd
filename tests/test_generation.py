from pipeline.models.generation import BatchedGenerator, bucket_length
from pipeline.text.tokens import stop_token_ids, strip_generated, tokenize_batch


def test_strip_generated_drops_prompt_and_stops_at_first_stop():
    stops = [1, 5]
    assert strip_generated([9, 9, 9, 7, 8, 5, 4, 1], 3, stops) == [7, 8]
    assert strip_generated([9, 9, 7, 8], 2, stops) == [7, 8]  # no stop: everything new
    assert strip_generated([9, 1, 7], 1, stops) == []


def test_stop_tokens_are_eos_and_end_of_turn(tiny_model):
    _, tokenizer = tiny_model
    stops = stop_token_ids(tokenizer, "<end_of_turn>")
    assert stops == [tokenizer.end_token_id, tokenizer.token_to_id("<end_of_turn>")]
    assert stop_token_ids(tokenizer) == [tokenizer.end_token_id]
    assert tokenize_batch(tokenizer, ["<end_of_turn>"]) == [[stops[1]]]


def test_bucket_lengths_round_the_prompt_to_the_step_and_add_the_new_tokens():
    assert bucket_length(10, 20, 64) == 84
    assert bucket_length(64, 20, 64) == 84
    assert bucket_length(65, 20, 64) == 148


class _ScriptedDecode:
    """Writes a fixed continuation after each prompt, like a decoder does
    with a stop token, and records the shapes it was called with."""

    def __init__(self, continuation):
        self.continuation = continuation
        self.shapes = []

    def __call__(self, token_ids, padding_mask, max_new_tokens):
        ids, mask = token_ids.copy(), padding_mask
        self.shapes.append(ids.shape)
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            cont = self.continuation[: ids.shape[1] - n]
            ids[r, n : n + len(cont)] = cont
        return ids


def test_generator_keeps_order_bounds_tokens_and_buckets(tiny_model):
    _, tokenizer = tiny_model
    words = tokenize_batch(tokenizer, ["cat dog"])[0]
    decode = _ScriptedDecode(words * 20 + [tokenizer.end_token_id])
    generator = BatchedGenerator(
        None,
        tokenizer,
        batch_size=4,
        max_new_tokens=len(words),
        length_step=16,
        log=lambda *_: None,
        decode=decode,
        stops=stop_token_ids(tokenizer, "<end_of_turn>"),
    )
    prompts = [[2] + [100] * n for n in (40, 3, 25, 3, 3, 60)]
    results = {}
    for indices, texts in generator.generate(prompts):
        results.update(zip(indices, texts, strict=True))
    assert sorted(results) == list(range(6))
    assert all(results[i] == "cat dog" for i in range(6))  # cut at max_new_tokens
    assert generator.new_tokens == 6 * len(words)
    # Shortest prompts first; every batch full-sized; lengths from the bucket set.
    expected = [(4, bucket_length(26, len(words), 16)), (4, bucket_length(61, len(words), 16))]
    assert decode.shapes == expected and expected[0][1] < expected[1][1]
    assert generator.programs == set(expected)
    for _ in generator.generate(prompts[:2]):
        pass
    assert generator.new_tokens == 2 * len(words)  # counts the latest call only


def test_generate_on_the_sharded_tiny_model_stops_and_strips(tiny_model):
    causal_lm, tokenizer = tiny_model
    generator = BatchedGenerator(
        causal_lm, tokenizer, batch_size=8, max_new_tokens=6, log=lambda *_: None
    )
    prompts = tokenize_batch(tokenizer, ["The old lighthouse", "Bees are small"], add_bos=True)
    out = dict(
        item
        for indices, texts in generator.generate(prompts)
        for item in zip(indices, texts, strict=True)
    )
    assert set(out) == {0, 1}
    for i, prompt_text in enumerate(["The old lighthouse", "Bees are small"]):
        assert not out[i].startswith(prompt_text)  # prompt stripped
        assert (
            0 < len(tokenize_batch(tokenizer, [out[i]])[0]) <= 8
        )  # bounded (re-tokenising may differ slightly)
