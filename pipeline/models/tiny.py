"""The embedded default: tiny stand-ins for Gemma, the other model
families, and sentence-t5.

Model and sentence-t5 weights cannot be downloaded offline, so the demo and
the tests build small artifacts of the same kinds and load them through the
same code paths as the real ones:

- a SentencePiece model of Gemma's kind (BPE with byte fallback, digits
  split, no normalisation) trained on the bundled demo text, and a unigram
  one as sentence-t5's for the encoder, both with Gemma's special tokens
  (`<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, then `<start_of_turn>`,
  `<end_of_turn>`);
- a tiny `GemmaCausalLM` (every dimension the (1, 8) mesh shards divides by
  8), pre-trained briefly on the demo text so that it writes words, saved with
  `save_to_preset` and loaded back with `from_preset(path)`;
- the same for every other family (`build_tiny_family`, `<family>_tiny/`),
  each with a tokenizer of its family's kind trained on the same text: Gemma
  3 takes Gemma's SentencePiece model; Mistral one with `<unk>`, `<s>`,
  `</s>` first (as Mistral's); Llama 3 and Qwen 3 a byte-level BPE
  (vocabulary and merges) with their special tokens last;
- a stand-in sentence encoder exported as a TF SavedModel with the st5 call
  signature: strings in, a one-element list whose `[0]` is `[N, D]` unit
  vectors, tokenised in-graph by tensorflow_text's SentencePiece op and cut
  at 128 tokens like st5. It averages fixed random piece embeddings, so
  prompts that share words score high.

Everything is seeded; `build_tiny_artifacts` skips what was already built
from the same inputs (`builder_key`) and builds again what was not. Builds
are kept once per machine (`stand_in_store`): `artifacts/tiny` is a link to
the store's build of the same inputs, so a second clone builds nothing, and
one process builds while the others wait for it.

Example:
```python
paths = build_tiny_artifacts("artifacts/tiny")
causal_lm = keras_hub.models.GemmaCausalLM.from_preset(paths.preset)
mistral = build_tiny_family("artifacts/tiny", "mistral")  # the preset's folder
```
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline.models.families import gemma
from pipeline.models.families.registry import FAMILIES
from pipeline.parallel.runtime import quiet_native_logs
from pipeline.text import rules, templates

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where the embedded default (configs/cpu_tiny.yaml) expects the stand-ins.
TINY_DIR = Path("artifacts") / "tiny"
DEMO_TEXTS = REPO_ROOT / "demo" / "texts.txt"
PROMPT_FILES = (REPO_ROOT / "demo" / "prompts.txt", REPO_ROOT / "prompts" / "rewrite_prompts.txt")

VOCABULARY_SIZE = 1024
ENCODER_DIM = 128
ENCODER_MAX_TOKENS = 128  # sentence-t5 truncates here too
SEED = 0

BACKBONE_CONFIG = gemma.FAMILY.tiny_config
# Special tokens of the byte-level BPE families (KerasHub's tokenizers name them).
BPE_SPECIAL_TOKENS = {
    "llama3": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
}


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

    def family_preset(self, name):
        """The tiny preset of family `name` (Gemma's is `preset`)."""
        return self.preset if name == "gemma" else self.root / f"{name}_tiny"


def build_tiny_artifacts(root, pretrain_steps=300, log=print, other_families=False):
    """Builds (or reuses) the tokenizer, tiny Gemma preset and encoder;
    with `other_families`, every other family's tiny preset too
    (`build_tiny_family`). A `root` that is not a folder of its own becomes a
    link to the machine's store (`linked_to_store`)."""
    paths = TinyPaths(linked_to_store(Path(root), pretrain_steps))
    with building(paths.root):
        clear_if_built_otherwise(paths.root, pretrain_steps, log)
        build_default_stand_ins(paths, pretrain_steps, log)
    if other_families:
        for name in FAMILIES:
            if name != "gemma":
                build_tiny_family(root, name, pretrain_steps, log)
    return paths


def build_default_stand_ins(paths, pretrain_steps, log):
    """What the embedded default uses and is not built yet: the tokenizers,
    the tiny Gemma and the encoder."""
    for path, model_type in ((paths.spm, "bpe"), (paths.encoder_spm, "unigram")):
        if not path.exists():
            log(f"tiny: training SentencePiece ({model_type}, {VOCABULARY_SIZE} pieces) -> {path}")
            path.write_bytes(train_sentencepiece(_tokenizer_corpus(), model_type))
    if not (paths.preset / "config.json").exists():
        log(f"tiny: building Gemma preset ({pretrain_steps} steps pre-trained) -> {paths.preset}")
        with quiet_native_logs():
            gemma_lm = build_tiny_gemma(paths.spm.read_bytes(), pretrain_steps, log)
            gemma_lm.save_to_preset(str(paths.preset))
    if not (paths.encoder / "assets" / "spiece.model").exists():
        log(f"tiny: exporting stand-in sentence encoder -> {paths.encoder}")
        with quiet_native_logs():
            export_stand_in_encoder(paths.encoder_spm.read_bytes(), paths.encoder)


def stand_in_store():
    """This machine's store of built stand-ins, shared by every clone:
    `$PROMPT_RECOVERY_CACHE`, else `$XDG_CACHE_HOME/prompt-recovery` (by
    default `~/.cache/prompt-recovery`)."""
    if os.environ.get("PROMPT_RECOVERY_CACHE"):
        return Path(os.environ["PROMPT_RECOVERY_CACHE"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "prompt-recovery"


def linked_to_store(root, pretrain_steps):
    """`root` itself when it is a folder of its own (built in place, as
    before); otherwise `root` made a link to the store's folder for these
    inputs (`builder_key`), which is returned."""
    if root.exists() and not root.is_symlink():
        return root
    target = stand_in_store() / "tiny" / builder_key(pretrain_steps)[:16]
    target.mkdir(parents=True, exist_ok=True)
    if not (root.is_symlink() and root.resolve() == target.resolve()):
        root.parent.mkdir(parents=True, exist_ok=True)
        staged = root.with_name(f".{root.name}.{os.getpid()}")
        staged.unlink(missing_ok=True)
        staged.symlink_to(target, target_is_directory=True)
        staged.replace(root)  # atomic: a process reading the old link finds one or the other
    return root


@contextlib.contextmanager
def building(folder):
    """Holds the build lock of `folder`: one process builds, the others wait
    and then find it built."""
    folder = folder.resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# What the stand-ins are built from, besides this module and the families'.
BUILDER_PACKAGES = (
    "keras",
    "keras-hub",
    "jax",
    "jaxlib",
    "tensorflow",
    "tensorflow-text",
    "sentencepiece",
    "tokenizers",
)


def builder_key(pretrain_steps):
    """A digest of everything the stand-ins are built from: this module, the
    families' modules, the demo text, the pre-training steps and the
    versions of the packages that build them. Built artifacts are kept while
    it stays the same, and built again when it changes."""
    digest = hashlib.sha256(f"pretrain_steps={pretrain_steps}".encode())
    families = Path(gemma.__file__).parent
    for source in [Path(__file__), DEMO_TEXTS, *sorted(families.glob("*.py"))]:
        digest.update(source.read_bytes())
    for package in BUILDER_PACKAGES:
        digest.update(f"{package}=={metadata.version(package)}".encode())
    return digest.hexdigest()


def clear_if_built_otherwise(root, pretrain_steps, log):
    """Empties `root` when what it holds was built from other inputs (see
    `builder_key`), and records the key of what will be built there."""
    key, stamp = builder_key(pretrain_steps), root / "builder.key"
    if root.exists() and any(root.iterdir()) and (not stamp.exists() or stamp.read_text() != key):
        log(f"tiny: {root} was built from other inputs (builder.key); building it again")
        shutil.rmtree(root.resolve())
    root.resolve().mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)


def build_tiny_artifacts_for(preset, log=print):
    """The stand-ins a run of the tiny preset `preset` (a path under
    `TINY_DIR`) needs: the encoder and tiny Gemma, and the preset's own
    family if it is another."""
    paths = build_tiny_artifacts(TINY_DIR, log=log)
    for name in FAMILIES:
        if name != "gemma" and Path(preset) == paths.family_preset(name):
            build_tiny_family(TINY_DIR, name, log=log)
    return paths


def build_tiny_family(root, name, pretrain_steps=300, log=print):
    """Builds (or reuses) the tiny preset of family `name`, its tokenizer
    trained on the demo text; returns the preset's folder."""
    paths = TinyPaths(linked_to_store(Path(root), pretrain_steps))
    preset = paths.family_preset(name)
    with building(paths.root):
        clear_if_built_otherwise(paths.root, pretrain_steps, log)
        if (preset / "config.json").exists():
            return preset
        family = FAMILIES[name]
        log(f"tiny: building {name} preset ({pretrain_steps} pre-training steps) -> {preset}")
        with quiet_native_logs():
            causal_lm = build_tiny_causal_lm(
                family, lambda: family_tokenizer(family, paths), pretrain_steps, log
            )
            if family.text_only_config:
                causal_lm = with_vision_tower(family, causal_lm)
            causal_lm.save_to_preset(str(preset))
    return preset


def with_vision_tower(family, causal_lm):
    """The tiny model with a random vision tower added, its decoder's
    weights kept: every preset of such a family has one, which the
    pipeline leaves out when it loads it (`Family.text_only_config`)."""
    import keras_hub

    models = keras_hub.models
    vision = models.Gemma4VisionEncoder(
        image_size=32,
        patch_size=8,
        num_heads=2,
        hidden_dim=16,
        num_layers=1,
        intermediate_dim=32,
        head_dim=8,
        output_dim=family.tiny_config["hidden_dim"],
        pool_size=2,
        position_embedding_size=16,
        dtype="float32",
    )
    backbone = getattr(models, family.backbone_class)(
        **dict(family.tiny_config, image_size=32, vision_encoder=vision), dtype="float32"
    )
    decoder = {weight.path: weight for weight in causal_lm.backbone.weights}
    for weight in backbone.weights:
        if weight.path in decoder:
            weight.assign(decoder[weight.path])
    return getattr(models, family.causal_lm_class)(
        backbone=backbone, preprocessor=causal_lm.preprocessor
    )


def family_tokenizer(family, paths):
    """A tokenizer of the family's kind, trained on the demo text (Gemma 3
    shares the tiny Gemma's SentencePiece model under `paths`)."""
    import keras_hub

    tokenizer_class = getattr(keras_hub.models, family.tokenizer_class)
    if family.name == "gemma3":
        if not paths.spm.exists():
            paths.spm.write_bytes(train_sentencepiece(_tokenizer_corpus(), "bpe"))
        return tokenizer_class(proto=paths.spm.read_bytes(), has_vision_tokens=False)
    if family.name == "gemma4":
        return tokenizer_class(
            proto=train_sentencepiece(_tokenizer_corpus(), "bpe", special_ids=GEMMA4_SPECIAL_IDS),
            has_audio_tokens=True,
        )
    if family.name == "mistral":
        return tokenizer_class(
            proto=train_sentencepiece(_tokenizer_corpus(), "bpe", special_ids=MISTRAL_SPECIAL_IDS)
        )
    vocabulary, merges = train_byte_level_bpe(_tokenizer_corpus(), BPE_SPECIAL_TOKENS[family.name])
    return tokenizer_class(
        vocabulary=vocabulary, merges=merges, unsplittable_tokens=BPE_SPECIAL_TOKENS[family.name]
    )


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


# Gemma's special pieces and ids (SentencePiece trainer arguments), Gemma 4's and Mistral's.
GEMMA_SPECIAL_IDS = dict(
    pad_id=0,
    eos_id=1,
    bos_id=2,
    unk_id=3,
    pad_piece="<pad>",
    eos_piece="<eos>",
    bos_piece="<bos>",
    unk_piece="<unk>",
    user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n", "\t"],
)
GEMMA4_SPECIAL_IDS = dict(
    GEMMA_SPECIAL_IDS,
    user_defined_symbols=[
        "<|turn>",
        "<turn|>",
        "<|image>",
        "<|image|>",
        "<image|>",
        "<|audio>",
        "<|audio|>",
        "<audio|>",
        "<|video|>",
        "\n",
        "\t",
    ],
)
MISTRAL_SPECIAL_IDS = dict(
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    unk_piece="<unk>",
    bos_piece="<s>",
    eos_piece="</s>",
    user_defined_symbols=["\n", "\t"],
)


def train_sentencepiece(
    lines, model_type, vocabulary_size=VOCABULARY_SIZE, special_ids=GEMMA_SPECIAL_IDS
):
    """Returns a serialized SentencePiece model with Gemma's special ids (or
    `special_ids`): "bpe" with byte fallback as Gemma's (transformers' Gemma
    converter reads it), or "unigram" as sentence-t5's."""
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
        **special_ids,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def train_byte_level_bpe(lines, special_tokens, vocabulary_size=VOCABULARY_SIZE):
    """(vocabulary, merges) of a byte-level BPE (GPT-2's byte alphabet, as
    Llama 3's and Qwen's) trained on `lines`, `special_tokens` given the
    last ids (so that id 0, the padding of KerasHub's Llama 3 tokenizer, is
    an ordinary piece, as in Llama 3)."""
    import tokenizers

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocabulary_size - len(special_tokens),
        show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(lines, trainer)
    pieces = sorted(bpe.get_vocab().items(), key=lambda item: item[1])
    vocabulary = {piece: i for i, (piece, _) in enumerate(pieces)}
    for token in special_tokens:
        vocabulary[token] = len(vocabulary)
    merges = [" ".join(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    return vocabulary, merges


def build_tiny_gemma(proto, pretrain_steps, log=print):
    """A tiny GemmaCausalLM pre-trained on the demo text (next-token loss)."""
    import keras_hub

    return build_tiny_causal_lm(
        gemma.FAMILY, lambda: keras_hub.models.GemmaTokenizer(proto=proto), pretrain_steps, log
    )


def build_tiny_causal_lm(family, make_tokenizer, pretrain_steps, log=print):
    """A tiny CausalLM of `family` (its `tiny_config`) pre-trained on the
    demo text (next-token loss); `make_tokenizer()` gives its tokenizer."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(SEED)
    # After the seed: seeding TensorFlow clears the SentencePiece op's resource.
    tokenizer = make_tokenizer()
    models = keras_hub.models
    preprocessor = getattr(models, family.causal_lm_class + "Preprocessor")(
        tokenizer, sequence_length=128
    )
    backbone = getattr(models, family.backbone_class)(**family.tiny_config, dtype="float32")
    causal_lm = getattr(models, family.causal_lm_class)(
        backbone=backbone, preprocessor=preprocessor
    )
    if pretrain_steps:
        words = " ".join(_demo_paragraphs()).split()
        windows = [" ".join(words[i : i + 60]) for i in range(0, len(words) - 30, 15)]
        # Gemma 3's and 4's preprocessors take (prompt, response) pairs only: empty prompts.
        pairs = family.name in ("gemma3", "gemma4")
        x = {"prompts": [""] * len(windows), "responses": windows} if pairs else windows
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
                x=x, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=True
            )
        log(
            f"tiny: {family.name} pre-training loss {history.history['loss'][0]:.2f} -> "
            f"{history.history['loss'][-1]:.2f}"
        )
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

        # Plain TF ops: AutoGraph has nothing to convert (and warns it cannot).
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
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
