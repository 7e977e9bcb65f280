"""Tokenizers: UTF-8 bytes, or a Hugging Face `tokenizers` JSON file. Each has an identity
(name and content hash) that a token store records, so a store is only read with the
tokenizer that made it."""

from __future__ import annotations

import hashlib

import fsspec
import numpy as np

from hyla.platform.data.config import DataConfig


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; EOS ends every document. vocab_size 258 leaves one
    id spare (the tiny preset's vocabulary)."""

    eos_id = 256
    vocab_size = 258
    EOS_TOKEN = "<|endoftext|>"
    eos_token = EOS_TOKEN
    name = "bytes"
    sha256 = hashlib.sha256(b"hyla byte tokenizer v1").hexdigest()

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """The same tokenizer as a `tokenizers` JSON file (for exported models and for
        transformers): byte-level, no merges, so byte b is token b and EOS is EOS_TOKEN."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        # byte-level tokenizers spell each byte as a printable character (GPT-2's mapping)
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        spelled, extra = {}, 0
        for b in range(256):
            if b in printable:
                spelled[b] = chr(b)
            else:
                spelled[b], extra = chr(256 + extra), extra + 1
        vocab = {spelled[b]: b for b in range(256)} | {self.EOS_TOKEN: self.eos_id}
        tokenizer = Tokenizer(models.BPE(vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([self.EOS_TOKEN])
        return tokenizer.to_str()


class JsonTokenizer:
    """A Hugging Face `tokenizers` JSON file (any fsspec URL); `eos_token` ends documents."""

    def __init__(self, url: str, eos_token: str | None) -> None:
        from tokenizers import Tokenizer

        try:
            with fsspec.open(url, "r", encoding="utf-8") as f:
                text = f.read()
            self.tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # missing file, bad JSON, not a tokenizer: one clear message
            raise ValueError(
                f"data.tokenizer {url!r} is not a readable tokenizers JSON file: {e}"
            ) from e
        eos_id = None if eos_token is None else self.tokenizer.token_to_id(eos_token)
        if eos_token is None or eos_id is None:
            raise ValueError(
                f"data.eos_token must name a token of the tokenizer {url!r} (it ends every "
                f"document), got {eos_token!r}"
            )
        self.eos_token, self.eos_id = eos_token, eos_id
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.name = url
        self.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """The same ids as `encode` of each text; `tokenizers` spreads the batch over its
        thread pool (RAYON_NUM_THREADS caps it)."""
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


Tokenizer = ByteTokenizer | JsonTokenizer


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    return JsonTokenizer(cfg.tokenizer, cfg.eos_token)


def fitting_tokenizer(cfg: DataConfig, vocab_size: int) -> Tokenizer:
    """The tokenizer, checked against the model's vocabulary."""
    tokenizer = load_tokenizer(cfg)
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size must be >= {tokenizer.vocab_size} for the tokenizer "
            f"data.tokenizer={cfg.tokenizer!r}, got {vocab_size}"
        )
    return tokenizer
