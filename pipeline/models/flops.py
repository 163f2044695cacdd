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


def matmul_parameter_count(spec):
    """Weights a token is multiplied by: every projection, and the output
    embedding (the input one is a lookup; tied or not, the output is one
    matmul)."""
    d = spec.dims
    attention = d.hidden_dim * d.head_dim * (2 * d.num_query_heads + 2 * d.num_key_value_heads)
    feed_forward = 3 * d.hidden_dim * d.ffw_dim
    return d.vocabulary_size * d.hidden_dim + d.num_layers * (attention + feed_forward)


def train_flops_per_token(spec, sequence_length, frozen=True):
    d = spec.dims
    weights = (4 if frozen else 6) * matmul_parameter_count(spec)
    attention = 12 * d.num_layers * sequence_length * d.num_query_heads * d.head_dim
    return weights + attention


def decode_flops_per_token(spec, context_length):
    d = spec.dims
    attention = 4 * d.num_layers * context_length * d.num_query_heads * d.head_dim
    return 2 * matmul_parameter_count(spec) + attention


def mfu(tokens_per_second, flops_per_token, peak_tflops_per_device, n_devices):
    if not peak_tflops_per_device:
        return None
    return tokens_per_second * flops_per_token / (peak_tflops_per_device * 1e12 * n_devices)
