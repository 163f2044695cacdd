"""The encoder's token limit: sentence-t5 sees 128 SentencePiece tokens of a
prompt and no more, so nothing past that is ever searched for or submitted.
SentencePiece only (no TensorFlow): the Kaggle notebook cuts with it too.

Example:
```python
limit = TokenLimit("artifacts/tiny/st5_standin/assets/spiece.model", 128)
limit("Improve the text to this.")  # True
limit.cut("a very long prompt ...")
```
"""


class TokenLimit:
    """True when the encoder sees all of a string (sentence-t5: 128 tokens)."""

    def __init__(self, piece_model_path, max_tokens):
        import sentencepiece as spm

        self.processor = spm.SentencePieceProcessor(model_file=str(piece_model_path))
        self.max_tokens = max_tokens

    def __call__(self, text):
        return len(self.processor.encode(text)) <= self.max_tokens

    def cut(self, text):
        """The longest word prefix of `text` within the limit."""
        words = text.split()
        while words and not self(" ".join(words)):
            words.pop()
        return " ".join(words)

    def pieces(self):
        return [self.processor.id_to_piece(i) for i in range(self.processor.get_piece_size())]
