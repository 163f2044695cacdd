"""Token-level format of the recovery task, shared by finetune and predict.

A training example is `<bos> prompt response <eos>` (no `<bos>` where the
tokenizer has no start token, as Qwen's); `pipeline.text.batching`
pads it and shifts it by one for next-token prediction. The sample weight is
1 on the response tokens (and `<eos>`) only: the prompt and the padding
teach nothing. Texts too long for `sequence_length` are cut
(original and rewritten text share the room left by the template and the
response budget), and counted. Predict builds its prompts with the same
code, so the model sees at inference exactly the tokens it was trained on.

Example:
```python
formatter = RecoveryFormatter(tokenizer, RECOVERY_TEMPLATE, 512, 64)
df, n_cut = formatter.fit_texts(df)
rows, n_responses_cut = formatter.encode(df)  # for pipeline.text.batching
```
"""

import numpy as np

from pipeline.errors import InputError
from pipeline.text.batching import EncodedRows
from pipeline.text.templates import format_recovery, worked_example
from pipeline.text.tokens import start_ids, tokenize_batch

_MARGIN = 4  # re-tokenising cut text can add a token or two
SHOT_COLUMNS = ["original_text", "rewritten_text", "rewrite_prompt"]  # a worked example's parts


class RecoveryFormatter:
    """Turns (original, rewritten, prompt) rows into the model's tokens.

    Args:
        tokenizer: the model's KerasHub tokenizer.
        template: the recovery template, with `{original_text}` and
            `{rewritten_text}`; the answer follows it directly.
        sequence_length: tokens per training example, answer included.
        max_response_tokens: room kept for the answer and `<eos>`; the
            texts share the rest.

    Example:
    ```python
    formatter = RecoveryFormatter(tokenizer, RECOVERY_TEMPLATE, 512, 64)
    df, n_cut = formatter.fit_texts(df)
    rows, n_responses_cut = formatter.encode(df)  # training
    prompt_ids = formatter.prompt_ids(df)  # generation
    ```
    """

    def __init__(self, tokenizer, template, sequence_length, max_response_tokens):
        self.tokenizer = tokenizer
        self.template = template
        self.sequence_length = sequence_length
        self.max_response_tokens = max_response_tokens
        self.prompt_budget = sequence_length - max_response_tokens
        self.start = start_ids(tokenizer)
        overhead = len(
            tokenize_batch(tokenizer, [format_recovery(template, "", "")], add_bos=True)[0]
        )
        self.text_budget = self.prompt_budget - overhead - _MARGIN
        if self.text_budget < 16:
            raise InputError(
                f"train.sequence_length={sequence_length} leaves {self.text_budget} tokens "
                "for the texts after the template and the response; raise it"
            )

    def fit_texts(self, df):
        """Cuts original/rewritten texts to fit; returns (df, rows cut)."""
        originals = tokenize_batch(self.tokenizer, df["original_text"])
        rewrites = tokenize_batch(self.tokenizer, df["rewritten_text"])
        df = df.copy()
        cut = 0
        for row, (o, r) in enumerate(zip(originals, rewrites, strict=True)):
            if len(o) + len(r) <= self.text_budget:
                continue
            keep_o, keep_r = share_budget(len(o), len(r), self.text_budget)
            df.iloc[row, df.columns.get_loc("original_text")] = _detok(self.tokenizer, o[:keep_o])
            df.iloc[row, df.columns.get_loc("rewritten_text")] = _detok(self.tokenizer, r[:keep_r])
            cut += 1
        return df, cut

    def prompt_texts(self, df):
        return [
            format_recovery(self.template, o, r)
            for o, r in zip(df["original_text"], df["rewritten_text"], strict=True)
        ]

    def prompt_ids(self, df):
        """`<bos>` + prompt tokens of each row, for generation."""
        ids = tokenize_batch(self.tokenizer, self.prompt_texts(df))
        keep = self.prompt_budget - len(self.start)
        return [self.start + row[-keep:] for row in ids]

    def encode(self, df):
        """`<bos> prompt response <eos>` token ids of every row, for training
        (`pipeline.text.batching`). Prompts keep their last tokens, as in
        `prompt_ids`; responses longer than
        `max_response_tokens - 1` are cut, and counted."""
        prompts = tokenize_batch(self.tokenizer, self.prompt_texts(df))
        responses = tokenize_batch(self.tokenizer, df["rewrite_prompt"])
        tok = self.tokenizer
        ids, prompt_lengths, cut = [], [], 0
        for prompt, response in zip(prompts, responses, strict=True):
            prompt = self.start + prompt[-(self.prompt_budget - len(self.start)) :]
            cut += len(response) > self.max_response_tokens - 1
            response = response[: self.max_response_tokens - 1] + [tok.end_token_id]
            ids.append(np.asarray(prompt + response, np.int32))
            prompt_lengths.append(len(prompt))
        return EncodedRows(ids, prompt_lengths, tok.pad_token_id), cut


def draw_shots(tokenizer, df, template, shots, seed, prompt_budget):
    """Indices of `shots` rows of `df` drawn with `seed` among those whose
    worked example (the template's prompt, the answer, a blank line) takes
    at most an equal share of half of `prompt_budget` tokens, so the row to
    answer keeps the other half. Raises InputError when too few fit."""
    examples = [worked_example(template, *row) for row in df[SHOT_COLUMNS].itertuples(index=False)]
    share = prompt_budget // 2 // shots
    fitting = [i for i, ids in enumerate(tokenize_batch(tokenizer, examples)) if len(ids) <= share]
    if len(fitting) < shots:
        raise InputError(
            f"train.shots={shots}: {len(fitting)} training row(s) fit a worked example in "
            f"{share} tokens (half of the prompt's {prompt_budget}, shared); raise "
            "train.sequence_length or lower train.shots"
        )
    return [int(i) for i in np.random.default_rng(seed).choice(fitting, shots, replace=False)]


def share_budget(n_original, n_rewritten, budget):
    """Tokens kept of each text: the shorter keeps all it can, up to half."""
    half = budget // 2
    if n_original <= half:
        return n_original, budget - n_original
    if n_rewritten <= half:
        return budget - n_rewritten, n_rewritten
    return half, budget - half


def _detok(tokenizer, ids):
    text = tokenizer.detokenize(np.asarray([ids], dtype="int32"))[0]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)
