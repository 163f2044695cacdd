"""Model FLOPs of a Gemma backbone, for MFU estimates.

Per trained token: 2 FLOPs per weight forward and 2 more backward for the
activation gradients; LoRA freezes the weights, so their weight gradients
(another 2 per weight) are not computed (the LoRA factors are negligible).
Attention scores and values add 4 * seq * heads * head_dim per layer forward,
three times that with the backward pass (XLA computes the masked square).

Example:
```python
flops = train_flops_per_token(backbone_config, sequence_length=512)
mfu = tokens_per_second * flops / (peak_tflops_per_device * 1e12 * n_devices)
```
"""


def gemma_parameter_count(config):
    hidden, heads, kv, head_dim = (config[k] for k in ("hidden_dim", "num_query_heads", "num_key_value_heads", "head_dim"))
    attention = hidden * head_dim * (2 * heads + 2 * kv)
    feed_forward = 3 * hidden * (config["intermediate_dim"] // 2)
    # The embedding also projects to the vocabulary at the output: one matmul.
    return config["vocabulary_size"] * hidden + config["num_layers"] * (attention + feed_forward)


def train_flops_per_token(config, sequence_length, frozen=True):
    weights = (4 if frozen else 6) * gemma_parameter_count(config)
    attention = 12 * config["num_layers"] * sequence_length * config["num_query_heads"] * config["head_dim"]
    return weights + attention


def decode_flops_per_token(config, context_length):
    attention = 4 * config["num_layers"] * context_length * config["num_query_heads"] * config["head_dim"]
    return 2 * gemma_parameter_count(config) + attention


def mfu(tokens_per_second, flops_per_token, peak_tflops_per_device, n_devices):
    if not peak_tflops_per_device:
        return None
    return tokens_per_second * flops_per_token / (peak_tflops_per_device * 1e12 * n_devices)
