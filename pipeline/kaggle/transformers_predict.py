"""Predict with Hugging Face transformers: the offline Kaggle notebook's path.

The Kaggle bundle (`pipeline.stages.bundle`) ships this module with the settings of
the run that trained the adapter. It builds the prompts with the training
code's own `RecoveryFormatter` (same template, same cut of long texts, same
tokens), decodes greedily in batches of similar length, stops at the end
token or the family's end of turn (settings.json), and combines the output
with the mean prompt as the predict stage does. It imports neither Keras,
JAX nor TensorFlow: a Kaggle GPU notebook has torch, and the bundle brings
the rest.

Example:
```python
settings = json.loads(Path("bundle/settings.json").read_text())
run_transformers_predict(settings, "bundle", "test.csv", "submission.csv")
```
"""

import json
import time
from pathlib import Path

import pandas as pd

from pipeline.text.combine import combine_parts
from pipeline.text.kaggle_paths import found_on_kaggle
from pipeline.text.openings import model_outputs
from pipeline.text.recovery import RecoveryFormatter
from pipeline.text.tables import TEST_COLUMNS, read_table, write_table
from pipeline.text.tokens import stop_token_ids, strip_generated


class TransformersTokenizer:
    """A transformers tokenizer behind the part of KerasHub's tokenizer
    interface that `RecoveryFormatter` and `pipeline.text.tokens` use.

    Example:
    ```python
    tokenizer = TransformersTokenizer(transformers.AutoTokenizer.from_pretrained(folder))
    tokenizer(["A cat sat."])  # [[...]], no <bos>
    ```
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.start_token_id = tokenizer.bos_token_id
        self.end_token_id = tokenizer.eos_token_id
        # Llama 3 and Mistral have no pad token: rows are left-padded under an
        # attention mask, so any id will do.
        self.pad_token_id = (
            tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        )

    def __call__(self, texts):
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def detokenize(self, rows):
        return [self.tokenizer.decode([int(t) for t in row]) for row in rows]

    def token_to_id(self, token):
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise KeyError(token)
        return token_id


def load_model(model_dir, adapter_dir, torch_dtype):
    """The model (with the PEFT adapter merged in) and its tokenizer. On
    GPUs the layers are spread over all of them (2 x T4: about half each)."""
    import torch
    import transformers

    options = {"dtype": getattr(torch, torch_dtype)}
    if torch.cuda.is_available():
        options["device_map"] = "auto"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), **options)
    if adapter_dir:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.eval()
    return model, TransformersTokenizer(transformers.AutoTokenizer.from_pretrained(str(model_dir)))


def generate(model, tokenizer, prompts, batch_size, max_new_tokens, end_of_turn, log=print, kept=0):
    """Greedy outputs (token ids, stop excluded) of every prompt, in input
    order, each beginning with the last `kept` tokens of its prompt (a
    forced opening). Batches hold prompts of similar length, left-padded; a
    row ends at the end token or `end_of_turn`."""
    import torch

    stops = stop_token_ids(tokenizer, end_of_turn)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs = [None] * len(prompts)
    device = next(model.parameters()).device
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        indices = order[first : first + batch_size]
        width = max(len(prompts[i]) for i in indices)
        token_ids = torch.full((len(indices), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            token_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            attention_mask[row, width - len(prompts[i]) :] = 1
        with torch.no_grad():
            generated = model.generate(
                input_ids=token_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row, i in enumerate(indices):
            outputs[i] = strip_generated(generated[row].tolist(), width - kept, stops)[
                : kept + max_new_tokens
            ]
        done = first + len(indices)
        log(
            f"generate: {done}/{len(prompts)} rows, {done / (time.perf_counter() - start):.2f} "
            "rows/s"
        )
    return outputs


def run_transformers_predict(settings, bundle_dir, input_csv, output_csv, log=print):
    """Writes the submission for `input_csv` (id, original_text,
    rewritten_text) with the bundle's model, adapter and settings."""
    bundle_dir = Path(bundle_dir)
    input_csv = found_on_kaggle(input_csv, log)
    df = read_table(
        input_csv, TEST_COLUMNS, ["original_text", "rewritten_text"], empty="keep", log=log
    )
    model_dir = found_on_kaggle(settings["base_model"], log)
    if model_dir == "export":
        model_dir = bundle_dir / "transformers"
    adapter_dir = bundle_dir / settings["adapter"] if settings["adapter"] else None
    log(
        f"predict: {len(df)} rows from {input_csv}; model {model_dir}, adapter "
        f"{adapter_dir or 'none'}"
    )
    model, tokenizer = load_model(model_dir, adapter_dir, settings["torch_dtype"])
    formatter = RecoveryFormatter(
        tokenizer,
        settings["template"],
        settings["sequence_length"],
        settings["max_response_tokens"],
    )
    df, n_cut = formatter.fit_texts(df)
    start = time.perf_counter()
    at_limit = []

    def generate_texts(prompts, kept):
        output_ids = generate(
            model,
            tokenizer,
            prompts,
            settings["batch_size"],
            settings["max_new_tokens"],
            settings["end_of_turn"],
            log,
            kept,
        )
        at_limit.extend(len(o) - kept == settings["max_new_tokens"] for o in output_ids)
        return tokenizer.detokenize(output_ids)

    outputs = model_outputs(
        formatter.prompt_ids(df),
        settings.get("openings", []),
        tokenizer,
        generate_texts,
        settings["separator"],
    )
    elapsed = time.perf_counter() - start
    parts = [
        outputs if name == "model" else [settings["mean_prompt"]] * len(df)
        for name in settings["combine"]
    ]
    cut = None
    if settings["combine"] != ["model"]:
        from pipeline.text.token_limit import TokenLimit

        cut = TokenLimit(bundle_dir / settings["piece_model"], settings["encoder_max_tokens"]).cut
    prompts, fallbacks = combine_parts(parts, settings["separator"], settings["fallback"], cut)
    write_table(pd.DataFrame({"id": df["id"], "rewrite_prompt": prompts}), output_csv)
    summary = {
        "rows": len(df),
        "texts_cut_to_fit": n_cut,
        "seconds": round(elapsed, 2),
        "rows_per_second": round(len(df) / elapsed, 3) if elapsed else None,
        "empty_predictions_replaced_by_fallback": fallbacks,
        "outputs_cut_at_max_new_tokens": sum(at_limit),
    }
    log(f"predict: {json.dumps(summary)} -> {output_csv}")
    return summary
