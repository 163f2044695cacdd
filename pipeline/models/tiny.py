"""The embedded default: tiny stand-ins for Gemma and sentence-t5.

Gemma and sentence-t5 weights cannot be downloaded offline, so the demo and
the tests build small artifacts of the same kinds and load them through the
same code paths as the real ones:

- a SentencePiece model of Gemma's kind (BPE with byte fallback, digits
  split, no normalisation) trained on the bundled demo text, and a unigram
  one as sentence-t5's for the encoder, both with Gemma's special tokens (`<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, then
  `<start_of_turn>`, `<end_of_turn>`);
- a tiny `GemmaCausalLM` (every dimension the (1, 8) mesh shards divides by
  8), pre-trained briefly on the demo text so that it writes words, saved with
  `save_to_preset` and loaded back with `from_preset(path)`;
- a stand-in sentence encoder exported as a TF SavedModel with the st5 call
  signature: strings in, a one-element list whose `[0]` is `[N, D]` unit
  vectors, tokenised in-graph by tensorflow_text's SentencePiece op and cut
  at 128 tokens like st5. It averages fixed random piece embeddings, so
  prompts that share words score high.

Everything is seeded; `build_tiny_artifacts` skips what already exists.

Example:
```python
paths = build_tiny_artifacts("artifacts/tiny")
causal_lm = keras_hub.models.GemmaCausalLM.from_preset(paths.preset)
```
"""

import dataclasses
import io
import json
import warnings
from pathlib import Path

import numpy as np

from pipeline.text import rules, templates
from pipeline.parallel.runtime import quiet_native_logs

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where the embedded default (configs/cpu_tiny.yaml) expects the stand-ins.
TINY_DIR = Path("artifacts") / "tiny"
DEMO_TEXTS = REPO_ROOT / "demo" / "texts.txt"
PROMPT_FILES = (REPO_ROOT / "demo" / "prompts.txt", REPO_ROOT / "prompts" / "rewrite_prompts.txt")

VOCABULARY_SIZE = 1024
ENCODER_DIM = 128
ENCODER_MAX_TOKENS = 128  # sentence-t5 truncates here too
SEED = 0

BACKBONE_CONFIG = dict(
    vocabulary_size=VOCABULARY_SIZE,
    num_layers=2,
    num_query_heads=8,
    num_key_value_heads=8,
    hidden_dim=128,
    intermediate_dim=512,
    head_dim=16,
)


@dataclasses.dataclass
class TinyPaths:
    root: Path

    @property
    def spm(self):
        return self.root / "tokenizer.spm"

    @property
    def encoder_spm(self):
        return self.root / "encoder_tokenizer.spm"

    @property
    def preset(self):
        return self.root / "gemma_tiny"

    @property
    def encoder(self):
        return self.root / "encoder"


def build_tiny_artifacts(root, pretrain_steps=300, log=print):
    """Builds (or reuses) the tokenizer, tiny Gemma preset and encoder."""
    paths = TinyPaths(Path(root))
    paths.root.mkdir(parents=True, exist_ok=True)
    for path, model_type in ((paths.spm, "bpe"), (paths.encoder_spm, "unigram")):
        if not path.exists():
            log(f"tiny: training SentencePiece ({model_type}, {VOCABULARY_SIZE} pieces) -> {path}")
            path.write_bytes(train_sentencepiece(_tokenizer_corpus(), model_type))
    proto = paths.spm.read_bytes()
    if not (paths.preset / "config.json").exists():
        log(f"tiny: building Gemma preset ({pretrain_steps} pre-training steps) -> {paths.preset}")
        with quiet_native_logs():
            build_tiny_gemma(proto, pretrain_steps, log).save_to_preset(str(paths.preset))
    if not (paths.encoder / "assets" / "spiece.model").exists():
        log(f"tiny: exporting stand-in sentence encoder -> {paths.encoder}")
        with quiet_native_logs():
            export_stand_in_encoder(paths.encoder_spm.read_bytes(), paths.encoder)
    return paths


def _demo_paragraphs():
    return [p.strip() for p in DEMO_TEXTS.read_text().split("\n\n") if p.strip()]


def _tokenizer_corpus():
    """Demo text, its rule-based rewrites, prompt pools and templates."""
    lines = []
    for paragraph in _demo_paragraphs():
        lines.append(paragraph)
        lines.extend(rule(paragraph) for rule in rules.RULES.values())
    for prompt_file in PROMPT_FILES:
        lines.extend(prompt_file.read_text().splitlines())
    lines.extend([templates.REWRITE_TEMPLATE, templates.RECOVERY_TEMPLATE])
    return [line for text in lines for line in text.splitlines() if line.strip()]


def train_sentencepiece(lines, model_type, vocabulary_size=VOCABULARY_SIZE):
    """Returns a serialized SentencePiece model with Gemma's special ids:
    "bpe" with byte fallback as Gemma's (transformers' Gemma converter reads
    it), or "unigram" as sentence-t5's."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocabulary_size,
        model_type=model_type,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        byte_fallback=model_type == "bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n", "\t"],
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def build_tiny_gemma(proto, pretrain_steps, log=print):
    """A tiny GemmaCausalLM pre-trained on the demo text (next-token loss)."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(SEED)
    tokenizer = keras_hub.models.GemmaTokenizer(proto=proto)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=128)
    backbone = keras_hub.models.GemmaBackbone(**BACKBONE_CONFIG, dtype="float32")
    causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    if pretrain_steps:
        words = " ".join(_demo_paragraphs()).split()
        windows = [" ".join(words[i : i + 60]) for i in range(0, len(words) - 30, 15)]
        causal_lm.compile(
            optimizer=keras.optimizers.AdamW(learning_rate=3e-3, weight_decay=0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
        )
        batch_size = 16
        epochs = max(1, pretrain_steps * batch_size // len(windows))
        with warnings.catch_warnings():
            # KerasHub feeds the arrays through tf.data, which it shuffles itself.
            warnings.filterwarnings("ignore", "`shuffle=True` was passed", UserWarning)
            history = causal_lm.fit(
                x=windows, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=True
            )
        log(f"tiny: pre-training loss {history.history['loss'][0]:.2f} -> {history.history['loss'][-1]:.2f}")
    return causal_lm


def export_stand_in_encoder(proto, directory, dim=ENCODER_DIM):
    """Exports a TF SavedModel that is called like sentence-t5."""
    import tensorflow as tf
    import tensorflow_text as tf_text

    class StandInSentenceEncoder(tf.Module):
        def __init__(self):
            super().__init__()
            self.tokenizer = tf_text.SentencepieceTokenizer(model=proto)
            vocab = int(self.tokenizer.vocab_size())
            table = np.random.default_rng(SEED).normal(size=(vocab, dim)).astype("float32")
            self.embeddings = tf.Variable(table, trainable=False)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, sentences):
            ids = self.tokenizer.tokenize(sentences)[:, :ENCODER_MAX_TOKENS]
            pooled = tf.reduce_mean(tf.gather(self.embeddings, ids), axis=1)
            return [tf.math.l2_normalize(pooled, axis=-1)]

    directory = Path(directory)
    tf.saved_model.save(StandInSentenceEncoder(), str(directory))
    # Where the mean-prompt search looks for the encoder's pieces.
    (directory / "assets").mkdir(exist_ok=True)
    (directory / "assets" / "spiece.model").write_bytes(proto)
    (directory / "stand_in.json").write_text(
        json.dumps({"kind": "stand-in sentence encoder", "dim": dim, "seed": SEED})
    )
