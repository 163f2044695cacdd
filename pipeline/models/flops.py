"""Model FLOPs of a backbone (any family), for MFU estimates.

Per trained token: 2 FLOPs per weight forward and 2 more backward for the
activation gradients; LoRA freezes the weights, so their weight gradients
(another 2 per weight) are not computed (the LoRA factors are negligible).
Attention scores and values add 4 * seq * heads * head_dim per layer forward,
three times that with the backward pass (XLA computes the masked square).

Example:
```python
flops = train_flops_per_token(read_model_spec(preset), sequence_length=512)
mfu = tokens_per_second * flops / (peak_tflops_per_device * 1e12 * n_devices)
```
"""

import numpy as np


def matmul_parameter_count(spec):
    """Weights a token is multiplied by: every matrix of `weight_dims` but
    the embedding tables only looked up (the input embedding where the
    output one is its own; Gemma 4's per-layer table)."""
    weights = spec.weight_dims()
    tied = "token_embedding/reverse_embeddings" not in weights
    return sum(
        int(np.prod([size for _, size in dims]))
        for path, dims in weights.items()
        if not path.endswith("/embeddings") or (tied and path == "token_embedding/embeddings")
    )


def attention_width(spec):
    """Query heads x head size, summed over the layers (Gemma 4's global
    layers have wider heads than its local ones)."""
    hidden = spec.dims.hidden_dim
    return sum(
        int(np.prod([size for _, size in dims])) // hidden
        for path, dims in spec.weight_dims().items()
        if path.endswith("/query/kernel")
    )


def train_flops_per_token(spec, sequence_length, frozen=True):
    weights = (4 if frozen else 6) * matmul_parameter_count(spec)
    return weights + 12 * sequence_length * attention_width(spec)


def decode_flops_per_token(spec, context_length):
    return 2 * matmul_parameter_count(spec) + 4 * context_length * attention_width(spec)


def mfu(tokens_per_second, flops_per_token, peak_tflops_per_device, n_devices):
    if not peak_tflops_per_device:
        return None
    return tokens_per_second * flops_per_token / (peak_tflops_per_device * 1e12 * n_devices)
