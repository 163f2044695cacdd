"""Forced openings: one generation per opening, each answer made to begin
with it, the answers joined.

1st place of the competition ran its models once per opening ("Rewrite",
"Make this text", ...), each prefilled as the start of the answer, and
concatenated the outputs (+0.01): the metric rewards covering the
phrasings a prompt may have. Both predict paths (Keras, and transformers in
the Kaggle notebook) call `model_outputs`, so they prefill the same tokens.

Example:
```python
outputs = model_outputs(prompt_ids, ["Rewrite", "Make this text"], tokenizer, generate, " ")
# generate(prompts, kept) -> the text of each row's output, its prompt's last `kept` tokens first
```
"""

from pipeline.text.tokens import tokenize_batch


def model_outputs(prompt_ids, openings, tokenizer, generate, separator):
    """The model's text for each prompt: the answers of `opening_answers`
    joined by `separator` in the openings' order (an empty one skipped)."""
    answers = opening_answers(prompt_ids, openings, tokenizer, generate)
    return join_answers(answers, separator)


def opening_answers(prompt_ids, openings, tokenizer, generate):
    """One list of texts per opening (one list, of free generations, for no
    openings). `generate(prompts, kept)` returns the text of each row's
    output, beginning with the last `kept` tokens of its prompt; each
    opening's generation runs from the prompt followed by the opening's
    tokens, so its texts begin with the opening."""
    if not openings:
        return [[text.strip() for text in generate(prompt_ids, 0)]]
    answers = []
    for opening in openings:
        (opening_ids,) = tokenize_batch(tokenizer, [opening])
        texts = generate([ids + opening_ids for ids in prompt_ids], len(opening_ids))
        answers.append([text.strip() for text in texts])
    return answers


def join_answers(answers, separator):
    """Each row's answers joined, an empty one skipped."""
    return [separator.join(text for text in row if text) for row in zip(*answers, strict=True)]
