"""Token-level format of the recovery task, shared by finetune and predict.

A training example is `<bos> prompt response <eos>`, padded to
`sequence_length + 1` and shifted by one for next-token prediction. The
sample weight is 1 on the response tokens (and `<eos>`) only: the prompt and
the padding teach nothing. Texts too long for `sequence_length` are cut
(original and rewritten text share the room left by the template and the
response budget), and counted. Predict builds its prompts with the same
code, so the model sees at inference exactly the tokens it was trained on.

Example:
```python
formatter = RecoveryFormatter(tokenizer, RECOVERY_TEMPLATE, 512, 64)
df, n_cut = formatter.fit_texts(df)
dataset = formatter.training_dataset(df, batch_size=2, shuffle_seed=0)
```
"""

import numpy as np

from pipeline.generation import tokenize_batch
from pipeline.templates import format_recovery

_MARGIN = 4  # re-tokenising cut text can add a token or two


class RecoveryFormatter:
    def __init__(self, tokenizer, template, sequence_length, max_response_tokens):
        self.tokenizer = tokenizer
        self.template = template
        self.sequence_length = sequence_length
        self.max_response_tokens = max_response_tokens
        self.prompt_budget = sequence_length - max_response_tokens
        overhead = len(tokenize_batch(tokenizer, [format_recovery(template, "", "")], add_bos=True)[0])
        self.text_budget = self.prompt_budget - overhead - _MARGIN
        if self.text_budget < 16:
            raise ValueError(
                f"train.sequence_length={sequence_length} leaves {self.text_budget} tokens "
                "for the texts after the template and the response; raise it"
            )

    def fit_texts(self, df):
        """Cuts original/rewritten texts to fit; returns (df, rows cut)."""
        originals = tokenize_batch(self.tokenizer, df["original_text"])
        rewrites = tokenize_batch(self.tokenizer, df["rewritten_text"])
        df = df.copy()
        cut = 0
        for row, (o, r) in enumerate(zip(originals, rewrites)):
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
            for o, r in zip(df["original_text"], df["rewritten_text"])
        ]

    def prompt_ids(self, df):
        """`<bos>` + prompt tokens of each row, for generation."""
        ids = tokenize_batch(self.tokenizer, self.prompt_texts(df))
        bos = self.tokenizer.start_token_id
        return [[bos] + row[-(self.prompt_budget - 1) :] for row in ids]

    def training_dataset(self, df, batch_size, shuffle_seed=None, pad_to_batch=False, length_step=None):
        """tf.data of (x, y, sample_weight) batches, tokenised in the pipeline.

        length_step: pad each batch only to the next multiple of this many
        tokens, grouping rows of similar length (a fixed set of shapes, each
        compiled once, so little compute goes to padding); None pads every
        row to `sequence_length`. Rows left over in a length group at the
        end of an epoch wait for the next reshuffle.
        pad_to_batch: append zero-weight copies of rows so that every batch
        is full and no row is dropped (used for validation, with one shape).
        """
        import tensorflow as tf

        prompts = self.prompt_texts(df)
        responses = list(df["rewrite_prompt"])
        weights = [1.0] * len(prompts)
        if pad_to_batch and len(prompts) % batch_size:
            extra = batch_size - len(prompts) % batch_size
            prompts += prompts[:1] * extra
            responses += responses[:1] * extra
            weights += [0.0] * extra
        dataset = tf.data.Dataset.from_tensor_slices((prompts, responses, weights))
        if shuffle_seed is not None:
            dataset = dataset.shuffle(len(prompts), seed=shuffle_seed, reshuffle_each_iteration=True)
        dataset = dataset.map(self._encode, num_parallel_calls=tf.data.AUTOTUNE)
        # A sequence of n tokens trains on n - 1 positions; pad n up to
        # step * k + 1 so that the model sees a multiple of `step`.
        step = length_step or self.sequence_length
        boundaries = list(range(step + 2, self.sequence_length + step + 2, step))
        dataset = dataset.bucket_by_sequence_length(
            lambda row: row["length"],
            bucket_boundaries=boundaries,
            bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
            padding_values={"ids": self.tokenizer.pad_token_id, "is_response": 0.0, "weight": 0.0, "length": 0},
            pad_to_bucket_boundary=True,
            drop_remainder=True,
        )
        return dataset.map(_shift_for_next_token).prefetch(tf.data.AUTOTUNE)

    def _encode(self, prompt, response, weight):
        import tensorflow as tf

        tok = self.tokenizer
        prompt_ids = tf.cast(tok(prompt), "int32")[-(self.prompt_budget - 1) :]
        response_ids = tf.cast(tok(response), "int32")[: self.max_response_tokens - 1]
        ids = tf.concat([[tok.start_token_id], prompt_ids, response_ids, [tok.end_token_id]], 0)
        n_prompt = 1 + tf.shape(prompt_ids)[0]
        n_total = tf.shape(ids)[0]
        is_response = tf.concat([tf.zeros([n_prompt]), tf.ones([n_total - n_prompt])], 0)
        return {"ids": ids, "is_response": is_response, "weight": weight, "length": n_total}


def _shift_for_next_token(batch):
    import tensorflow as tf

    ids = batch["ids"]
    mask = tf.range(tf.shape(ids)[1])[None, :] < batch["length"][:, None]
    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    return x, ids[:, 1:], batch["is_response"][:, 1:] * batch["weight"][:, None]


def count_tokens(dataset):
    """(batches, real tokens, computed tokens) in one pass of a dataset."""
    batches = real = computed = 0
    for x, _, _ in dataset:
        batches += 1
        real += int(x["padding_mask"].numpy().sum())
        computed += int(np.prod(x["token_ids"].shape))
    return batches, real, computed


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
