"""SentencePiece tokenizer that gives the same ids as transformers' (slow) `T5Tokenizer` in its
default legacy mode (`legacy=True`, the behaviour of PixArt / Open-Sora and of the DeepFloyd
tokenizer config; checked against transformers 4.57.6), and a tiny trainer for the demo.

What `T5Tokenizer(spiece.model)(texts, max_length=L, padding="max_length", truncation=True)` does,
reproduced here:
  1. The special tokens `</s>`, `<unk>`, `<pad>` and the 100 sentinels `<extra_id_0..99>` written
     in the text are split out and map to their ids (sentinel i -> sp_size + 99 - i); sentinels
     also eat the whitespace on both sides.
  2. Every other chunk is encoded by SentencePiece on its own (so each gets the dummy "▁" prefix).
  3. Ids are truncated to L - 1 and EOS (1) is appended unless the ids already end with it.
  4. Right-padded with pad id 0 to L; attention mask 1 on tokens, 0 on padding.
"""
from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import sentencepiece as spm

log = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


class T5Tokenizer:
    """T5 tokenizer over a SentencePiece model: `tok(texts, max_length) -> (input_ids, attention_mask)`,
    both np.int32 [B, max_length]."""

    def __init__(self, spiece_model_path: str, extra_ids: int = 100):
        path = Path(spiece_model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.sp_size = self.sp.get_piece_size()
        self.pad_token_id, self.eos_token_id, self.unk_token_id = (self._piece_id(t) for t in (PAD, EOS, UNK))
        self.extra_ids = extra_ids
        # added tokens: name -> (id, strips surrounding whitespace)
        self.added = {PAD: (self.pad_token_id, False), EOS: (self.eos_token_id, False),
                      UNK: (self.unk_token_id, False)}
        for i in range(extra_ids):
            self.added[f"<extra_id_{i}>"] = (self.sp_size - 1 + extra_ids - i, True)
        alternatives = sorted(self.added, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    def _piece_id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(i) != piece:
            raise ValueError(f"{self.path} has no piece {piece!r}: not a T5-style SentencePiece model")
        return i

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus sentinel ids (the embedding table must be at least this big)."""
        return self.sp_size + self.extra_ids

    def tokenize(self, text: str) -> list[str]:
        """Pieces and special tokens of one text, without EOS (transformers' `tokenize`)."""
        chunks = self._split_re.split(text)  # odd positions are special tokens
        for i in range(1, len(chunks), 2):
            if self.added[chunks[i]][1]:  # sentinel: strips whitespace on both sides
                chunks[i - 1] = chunks[i - 1].rstrip()
                if i + 1 < len(chunks):
                    chunks[i + 1] = chunks[i + 1].lstrip()
        tokens = []
        for i, chunk in enumerate(chunks):
            if i % 2:
                tokens.append(chunk)
            elif chunk:
                tokens.extend(self.sp.encode(chunk, out_type=str))
        return tokens

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.added[t][0] if t in self.added else self.sp.piece_to_id(t) for t in tokens]

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Ids of one text with EOS appended (unless already last), truncated to `max_length`."""
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if max_length is not None and len(ids) + 1 > max_length:
            ids = ids[:max(max_length - 1, 0)]
        if not ids or ids[-1] != self.eos_token_id:
            ids = ids + [self.eos_token_id]
        return ids

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 1:
            raise ValueError(f"max_length={max_length}: need room for at least the EOS token")
        input_ids = np.full((len(texts), max_length), self.pad_token_id, np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        for b, text in enumerate(texts):
            ids = self.encode(text, max_length)
            input_ids[b, :len(ids)] = ids
            mask[b, :len(ids)] = 1
        return input_ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, stopping at the first EOS and skipping padding (for inspection only)."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                break
            if i != self.pad_token_id and i < self.sp_size:
                out.append(i)
        return self.sp.decode(out)


# ================================================================
# Training a tiny tokenizer
# ================================================================


def _drop_rare_characters(texts: Sequence[str], max_chars: int) -> list[str]:
    """Texts (NFKC) without the characters beyond the `max_chars` most frequent ones, counting the
    whitespace marker "▁" like SentencePiece does (SentencePiece refuses a vocabulary smaller
    than the character set, and character_coverage < 0.98)."""
    texts = [unicodedata.normalize("NFKC", t) for t in texts]
    counts = Counter()
    for t in texts:
        counts.update("\u2581" + "\u2581".join(t.split()))
    if len(counts) <= max_chars:
        return texts
    keep = {c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_chars]}
    log.info("train_sentencepiece: %d distinct characters, keeping the %d most frequent", len(counts), max_chars)
    return ["".join(c for c in t if c in keep or c.isspace()) for t in texts]


def train_sentencepiece(texts: list[str], out_dir: str, vocab_size: int = 64) -> str:
    """Train a tiny T5-style `spiece.model` (pad 0 "<pad>", eos 1 "</s>", unk 2 "<unk>", no bos)
    on `texts`; returns its path. Deterministic (single thread, no shuffling).

    BPE rather than T5's unigram: on a few dozen captions the unigram trainer collapses to single
    characters, whereas BPE learns the caption words. `vocab_size` is a soft upper bound (fewer
    pieces when the corpus is too small); when the texts have more distinct characters than fit,
    the rarest ones are left out of training (they become <unk>).
    """
    if vocab_size < 8:
        raise ValueError(f"vocab_size={vocab_size} is too small for a tokenizer (need >= 8)")
    texts = _drop_rare_characters([str(t) for t in texts], vocab_size - 3)  # 3 = pad, eos, unk
    texts = [t for t in (t.strip() for t in texts) if t]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "spiece"
    args = dict(model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
                pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece=PAD, eos_piece=EOS, unk_piece=UNK,
                hard_vocab_limit=False, character_coverage=1.0,
                num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
                max_sentence_length=1 << 16, minloglevel=2)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), **args)
    vocab_file = prefix.with_suffix(".vocab")
    if vocab_file.exists():
        os.remove(vocab_file)
    path = str(prefix.with_suffix(".model"))
    n = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    if n > vocab_size:  # never seen; the encoder's embedding table relies on it
        raise RuntimeError(f"trained tokenizer has {n} pieces > vocab_size={vocab_size}")
    log.info("trained SentencePiece (bpe) on %d texts: %d pieces -> %s", len(texts), n, path)
    return path
