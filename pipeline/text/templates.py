"""Prompt templates: the data stage's rewrite request and the recovery task.

Both come from the reference notebooks (Part 1 and Part 2). The recovery
template ends where the model's answer starts; the answer (the rewrite
prompt) is appended by the caller, and only its tokens carry loss.

Example:
```python
text = format_recovery(RECOVERY_TEMPLATE, "A cat sat.", "A CAT SAT.")
text.endswith("### Response:\\n")  # True
```
"""

REWRITE_TEMPLATE = (
    "Instruction:\n{rewrite_prompt}\n\nOriginal Text:\n{original_text}\n\nResponse:\n"
)

RECOVERY_TEMPLATE = (
    "### Instruction:\n"
    "Below, the `Original Text` passage has been rewritten/transformed/improved "
    "into `Rewritten Text` by the `Gemma 7b-it` LLM with a certain "
    "prompt/instruction. Your task is to carefully analyze the differences "
    "between the `Original Text` and `Rewritten Text`, and try to infer the "
    "specific prompt or instruction that was likely given to the LLM to "
    "rewrite/transform/improve the text in this way.\n\n"
    "### Original Text:\n{original_text}\n\n"
    "### Rewritten Text:\n{rewritten_text}\n\n"
    "### Response:\n"
)


def format_rewrite_request(template, rewrite_prompt, original_text, chat_turn=None):
    """The request that asks the instruct model for a rewrite: one user turn
    in the model family's chat format (`chat_turn`, with `{content}`; see
    `pipeline.models.families`), or (None, as the reference did) the bare
    template."""
    content = template.format(rewrite_prompt=rewrite_prompt, original_text=original_text)
    return chat_turn.format(content=content) if chat_turn else content


def format_recovery(template, original_text, rewritten_text):
    """The recovery prompt; the model's answer follows it directly."""
    return template.format(original_text=original_text, rewritten_text=rewritten_text)


def few_shot_template(template, shots):
    """`template` after worked examples (2nd and 3rd place prompted with a
    few): each shot, an (original, rewritten, prompt) row, formatted by the
    template and followed by its prompt and a blank line. Braces in the
    shots are escaped, so the result is a template again."""
    examples = "".join(worked_example(template, *shot) for shot in shots)
    return examples.replace("{", "{{").replace("}", "}}") + template


def worked_example(template, original_text, rewritten_text, rewrite_prompt):
    """One row as a few-shot example: its recovery prompt, the answer, a
    blank line."""
    return format_recovery(template, original_text, rewritten_text) + rewrite_prompt + "\n\n"
