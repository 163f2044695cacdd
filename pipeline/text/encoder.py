"""The sentence encoder the competition scores with, and its metric.

sentence-t5 (a TF Hub SavedModel) embeds each prompt; two prompts score
the sharpened cosine similarity `cos**3` of their unit vectors. Its
SentencePiece model counts tokens: the encoder sees 128 and no more, so
nothing past that is ever searched for or submitted.

Example:
```python
encoder = load_sentence_encoder("https://tfhub.dev/google/sentence-t5/st5-base/1")
vectors = embed(encoder, ["Improve the text to this."])
sharpened_cosine(vectors, vectors)  # array([1.])
cut = encoder_token_limit(cfg)  # a TokenLimit's cut, from the config's encoder
```
"""

from pathlib import Path

import numpy as np

from pipeline.errors import InputError, MissingInputError
from pipeline.parallel.runtime import quiet_native_logs
from pipeline.text.token_limit import TokenLimit


def encoder_folder(handle):
    """The local folder of the encoder: a TF Hub URL (downloaded to TF Hub's
    cache), a Kaggle Models handle (downloaded by kagglehub) or a folder."""
    handle = str(handle)
    if Path(handle).is_dir():
        return Path(handle)
    if handle.startswith(("http://", "https://")):
        return Path(_tensorflow_hub().resolve(handle))
    kaggle_handle = handle.removeprefix("kaggle://")
    if kaggle_handle.count("/") >= 3:  # owner/model/framework/variation[/version]
        import kagglehub

        return Path(kagglehub.model_download(kaggle_handle))
    raise InputError(
        f"score.encoder {handle!r}: not a URL, an existing folder, or a Kaggle Models "
        "handle such as google/sentence-t5/tensorFlow2/st5-base"
    )


def load_sentence_encoder(handle):
    """A TF Hub URL, a Kaggle Models handle or a local SavedModel folder."""
    import tensorflow_text  # noqa: F401  registers the SentencePiece op

    hub = _tensorflow_hub()
    with quiet_native_logs():  # SentencePiece's normalizer notice
        return hub.load(str(encoder_folder(handle)))


def _tensorflow_hub():
    import warnings

    with warnings.catch_warnings():
        # tensorflow_hub 0.16 imports the deprecated pkg_resources.
        warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
        import tensorflow_hub

    return tensorflow_hub


def embed(encoder, texts, batch_size=64):
    """[N, D] unit vectors."""
    import tensorflow as tf

    parts = []
    for start in range(0, len(texts), batch_size):
        out = encoder(tf.constant(list(texts[start : start + batch_size])))
        out = out[0] if isinstance(out, (list, tuple)) else out
        parts.append(np.asarray(out, dtype="float64"))
    vectors = np.concatenate(parts) if parts else np.zeros((0, 1))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)


def sharpened_cosine(a, b):
    """Row-wise cos**3 of two [N, D] arrays (normalised here)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return np.sum(a * b, axis=1) ** 3


def score_prompts(encoder, predicted, truth, batch_size=64):
    """Per-row sharpened cosine similarity of two lists of prompts."""
    return sharpened_cosine(
        embed(encoder, predicted, batch_size), embed(encoder, truth, batch_size)
    )


def find_piece_model(encoder_handle, piece_model=None):
    """The encoder's SentencePiece model file (for token counts, pieces)."""
    if piece_model:
        return Path(piece_model)
    folder = encoder_folder(encoder_handle)
    found = sorted((folder / "assets").glob("*.model"))
    if not found:
        raise MissingInputError(
            f"no SentencePiece model in {folder / 'assets'}; set mean_prompt.piece_model "
            "to the encoder's .model file"
        )
    return found[0]


def encoder_token_limit(cfg):
    """Cuts a combined prompt to what the encoder sees."""
    return TokenLimit(
        find_piece_model(cfg.score.encoder, cfg.mean_prompt.piece_model), cfg.mean_prompt.max_tokens
    ).cut
