"""Greedy decoding with KerasHub's own decoding step, for the family whose
blocks `decoding.CachedDecoder` does not read (Gemma 4: per-layer inputs,
key/value caches shared between layers).

`CausalLM.generate_step` is the program KerasHub's `generate` compiles; this
runs it the way `CachedDecoder` runs its own: compiled once per (batch,
length) bucket, with the model's weights as arguments and each host feeding
its own rows of the global batch (so it runs on a pod too). Its tokens are
`generate`'s. Rows go on past their own `max_new_tokens` until every row has
stopped or the bucket is full; `BatchedGenerator` cuts them.

Example:
```python
decode = KerasHubStepDecoder(causal_lm, stop_token_ids=[2])
token_ids = decode(token_ids, padding_mask, max_new_tokens=64)  # numpy in, numpy out
```
"""

import jax

from pipeline.models.decoding import global_prompts, model_state, state_scope
from pipeline.parallel import hosts


class KerasHubStepDecoder:
    """Greedy `generate_step` of a KerasHub `CausalLM`, compiled once per shape.

    Args:
        causal_lm: any KerasHub `CausalLM` (LoRA enabled or not); its
            current weights are read at every call. Its sampler is set to
            greedy: every stage decodes greedily, and Mistral, Llama and
            Qwen compile with top-k by default.
        stop_token_ids: ids that end a row.
    """

    def __init__(self, causal_lm, stop_token_ids):
        import keras_hub

        causal_lm.sampler = keras_hub.samplers.GreedySampler()
        self.causal_lm = causal_lm
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self._compiled = jax.jit(self._stateless_decode)

    def __call__(self, token_ids, padding_mask, max_new_tokens):
        """Prompts right-padded in (batch, length) `token_ids`; returns the
        same shape with each row's generated tokens after its prompt (up to
        the end of the bucket, whatever `max_new_tokens`)."""
        out = self._compiled(model_state(self.causal_lm), *global_prompts(token_ids, padding_mask))
        return hosts.to_numpy(out)

    def lower(self, token_ids, padding_mask, max_new_tokens, state=None):
        """The program of a call, lowered and not run; with `state` (as
        `model_state` gives it) every argument may be a
        `jax.ShapeDtypeStruct` (`compiled_memory`)."""
        if state is None:
            state, (token_ids, padding_mask) = (
                model_state(self.causal_lm),
                global_prompts(token_ids, padding_mask),
            )
        return self._compiled.lower(state, token_ids, padding_mask)

    def _stateless_decode(self, state, token_ids, padding_mask):
        # A greedy sampler has no variables of its own to map.
        with state_scope(self.causal_lm, state):
            outputs = self.causal_lm.generate_step(
                {"token_ids": token_ids, "padding_mask": padding_mask}, self.stop_token_ids
            )
        return outputs["token_ids"]
