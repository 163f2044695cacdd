"""Token helpers shared by training and generation.

Example:
```python
ids = tokenize_batch(tokenizer, ["A cat sat."], add_bos=True)  # [[2, ...]] (Gemma's <bos> is 2)
stops = stop_token_ids(tokenizer, "<end_of_turn>")  # <eos> and Gemma's end of turn
strip_generated(output_ids, len(ids[0]), stops)  # the new tokens, up to a stop
```
"""


def start_ids(tokenizer):
    """What a sequence starts with: the start token (`<bos>`), or nothing
    for a tokenizer without one (Qwen's)."""
    start = tokenizer.start_token_id
    return [] if start is None else [start]


def tokenize_batch(tokenizer, texts, add_bos=False):
    """Token ids of each text as Python lists; `add_bos`: each after the
    start token, where the tokenizer has one."""
    ids = tokenizer(list(texts))
    if hasattr(ids, "to_list"):  # a tf.RaggedTensor
        ids = ids.to_list()
    ids = [list(map(int, row)) for row in ids]
    if add_bos:
        ids = [start_ids(tokenizer) + row for row in ids]
    return ids


def stop_token_ids(tokenizer, end_of_turn=None):
    """The end token, and the token `end_of_turn` that ends an instruct
    model's turn where the vocabulary has it."""
    stops = [tokenizer.end_token_id]
    if end_of_turn:
        try:
            stops.append(tokenizer.token_to_id(end_of_turn))
        except (KeyError, ValueError):
            pass
    return list(dict.fromkeys(stops))


def strip_generated(token_ids, prompt_length, stops):
    """The tokens after the prompt, up to (not including) the first stop."""
    generated = [int(t) for t in token_ids[prompt_length:]]
    for i, token in enumerate(generated):
        if token in stops:
            return generated[:i]
    return generated
