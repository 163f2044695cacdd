"""Batched, length-bucketed generation, for every model family.

Rows are sorted by prompt length and generated `batch_size` at a time. Each
batch is padded to a fixed batch size and its prompts to a length rounded up
to `length_step`, plus room for `max_new_tokens`, so XLA compiles one program
per bucket instead of one per batch, and a short prompt never pays for the
longest one. Decoding is `pipeline.models.decoding.CachedDecoder`: each
row stops at the end token or the family's end of turn, at most
`max_new_tokens` after its own prompt, and the batch as soon as every row
has; the echoed prompt is stripped.

Example:
```python
generator = BatchedGenerator(causal_lm, tokenizer, batch_size=8, max_new_tokens=35)
prompts = tokenize_batch(tokenizer, texts, add_bos=True)
for indices, outputs in generator.generate(prompts):
    ...  # outputs[i] is the text generated for prompts[indices[i]]
```
"""

import time

import numpy as np

from pipeline.models.decoding import CachedDecoder
from pipeline.models.model import family_of
from pipeline.text.tokens import stop_token_ids, strip_generated


def bucket_length(longest_prompt, max_new_tokens, length_step):
    """The padded length of a batch: its prompt bucket plus the new tokens."""
    return -(-longest_prompt // length_step) * length_step + max_new_tokens


class BatchedGenerator:
    """Generates for many prompts in batches of similar length.

    Args:
        causal_lm: the KerasHub `CausalLM` (any family in `families`).
        tokenizer: its tokenizer (detokenises the outputs).
        batch_size: rows per batch (global, over all hosts).
        max_new_tokens: tokens generated at most per row.
        length_step: prompt lengths round up to a multiple of this.
        log: where progress lines go.
        decode: `decode(token_ids, padding_mask, max_new_tokens)` returns
            the token ids with the generation written after each prompt;
            default: `CachedDecoder(causal_lm, stops)`.
        stops: stop token ids (default: the end token and the family's
            end of turn).

    Example:
    ```python
    generator = BatchedGenerator(causal_lm, tokenizer, batch_size=8, max_new_tokens=35)
    for indices, texts in generator.generate(prompt_ids):
        ...
    ```
    """

    def __init__(
        self,
        causal_lm,
        tokenizer,
        batch_size,
        max_new_tokens,
        length_step=64,
        log=print,
        decode=None,
        stops=None,
    ):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.length_step = length_step
        self.log = log
        self.stops = stops or stop_token_ids(tokenizer, family_of(causal_lm).end_of_turn)
        self.decode = decode or CachedDecoder(causal_lm, self.stops)
        self.programs = set()  # (batch, length) shapes compiled so far
        self.new_tokens = 0  # by the latest `generate`, stop tokens excluded
        self.rows_at_limit = 0  # rows cut at max_new_tokens, over every `generate`

    def generate(self, prompts, skip=None, kept=0):
        """Yields (indices, texts) batch by batch, shortest prompts first.
        `skip(indices)`: True for a batch not to generate (already done). The
        batches depend on `prompts` alone, so a resumed run decodes each row
        in the batch, and so with the tokens, of an uninterrupted one. Each
        text begins with the last `kept` tokens of its prompt (a forced
        opening), then `max_new_tokens` at most."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        batches = [
            order[start : start + self.batch_size]
            for start in range(0, len(order), self.batch_size)
        ]
        batches = [indices for indices in batches if not (skip and skip(indices))]
        total = sum(map(len, batches))
        start_time, rows_done, self.new_tokens = time.perf_counter(), 0, 0
        for indices in batches:
            batch = [prompts[i] for i in indices]
            outputs = self._generate_batch(batch, kept)
            self.new_tokens += sum(len(o) - kept for o in outputs)
            self.rows_at_limit += sum(len(o) - kept == self.max_new_tokens for o in outputs)
            rows_done += len(indices)
            elapsed = time.perf_counter() - start_time
            self.log(
                f"generate: {rows_done}/{total} rows, {rows_done / elapsed:.2f} rows/s, "
                f"{self.new_tokens / elapsed:.1f} new tokens/s, {len(self.programs)} compiled "
                "shapes"
            )
            texts = self.tokenizer.detokenize(outputs) if outputs else []
            yield indices, [_to_str(t) for t in texts]

    def texts(self, prompts, kept=0):
        """The text of every prompt's output, in the prompts' order."""
        texts = [""] * len(prompts)
        for indices, batch_texts in self.generate(prompts, kept=kept):
            for i, text in zip(indices, batch_texts, strict=True):
                texts[i] = text
        return texts

    def _generate_batch(self, batch, kept):
        length = bucket_length(max(map(len, batch)), self.max_new_tokens, self.length_step)
        # Fill the batch to its fixed size so every batch has one shape.
        rows = batch + [batch[-1]] * (self.batch_size - len(batch))
        token_ids = np.zeros((self.batch_size, length), dtype="int32")
        padding_mask = np.zeros((self.batch_size, length), dtype=bool)
        for r, ids in enumerate(rows):
            token_ids[r, : len(ids)] = ids
            padding_mask[r, : len(ids)] = True
        self.programs.add((self.batch_size, length))
        out_ids = np.asarray(self.decode(token_ids, padding_mask, self.max_new_tokens))
        return [
            strip_generated(out_ids[r], len(ids) - kept, self.stops)[: kept + self.max_new_tokens]
            for r, ids in enumerate(batch)
        ]


def _to_str(text):
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    if hasattr(text, "numpy"):
        return _to_str(text.numpy())
    return str(text)
