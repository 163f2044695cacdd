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

    def training_dataset(self, df, batch_size, shuffle_seed=None, pad_to_batch=False):
        """tf.data of (x, y, sample_weight) batches, tokenised in the pipeline.

        pad_to_batch: append zero-weight copies of rows so that every batch
        is full (one compiled shape; used for validation, where no row may
        be dropped).
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
        return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def _encode(self, prompt, response, weight):
        import tensorflow as tf

        tok = self.tokenizer
        prompt_ids = tf.cast(tok(prompt), "int32")[-(self.prompt_budget - 1) :]
        response_ids = tf.cast(tok(response), "int32")[: self.max_response_tokens - 1]
        ids = tf.concat([[tok.start_token_id], prompt_ids, response_ids, [tok.end_token_id]], 0)
        n_prompt = 1 + tf.shape(prompt_ids)[0]
        n_total = tf.shape(ids)[0]
        is_response = tf.concat([tf.zeros([n_prompt]), tf.ones([n_total - n_prompt])], 0)
        pad = self.sequence_length + 1 - n_total
        ids = tf.pad(ids, [[0, pad]], constant_values=tok.pad_token_id)
        is_response = tf.pad(is_response, [[0, pad]])
        mask = tf.range(self.sequence_length + 1) < n_total
        x = {"token_ids": ids[:-1], "padding_mask": mask[:-1]}
        return x, ids[1:], is_response[1:] * weight


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
