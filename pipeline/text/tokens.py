"""Token helpers shared by training and generation.

Example:
```python
ids = tokenize_batch(tokenizer, ["A cat sat."], add_bos=True)  # [[2, ...]]
stops = stop_token_ids(tokenizer)  # <eos>, and <end_of_turn> for instruct models
strip_generated(output_ids, len(ids[0]), stops)  # the new tokens, up to a stop
```
"""

from pipeline.text.templates import END_OF_TURN


def tokenize_batch(tokenizer, texts, add_bos=False):
    """Token ids of each text as Python lists."""
    ids = tokenizer(list(texts))
    if hasattr(ids, "to_list"):  # a tf.RaggedTensor
        ids = ids.to_list()
    ids = [list(map(int, row)) for row in ids]
    if add_bos:
        ids = [[tokenizer.start_token_id] + row for row in ids]
    return ids


def stop_token_ids(tokenizer):
    """`<eos>`, and `<end_of_turn>` where the vocabulary has it (instruct)."""
    stops = [tokenizer.end_token_id]
    try:
        stops.append(tokenizer.token_to_id(END_OF_TURN))
    except (KeyError, ValueError):
        pass
    return stops


def strip_generated(token_ids, prompt_length, stops):
    """The tokens after the prompt, up to (not including) the first stop."""
    generated = [int(t) for t in token_ids[prompt_length:]]
    for i, token in enumerate(generated):
        if token in stops:
            return generated[:i]
    return generated
