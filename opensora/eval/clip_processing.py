"""CLIP inputs: the tokenizer and the image preprocessing of a Hugging Face CLIP folder.

Tokenizer: the `tokenizers` library (Rust, no torch) on the folder's tokenizer.json, or, when it has
only vocab.json + merges.txt, the same byte-level BPE built the way transformers converts the slow
CLIPTokenizer to CLIPTokenizerFast: NFC, whitespace runs -> one space, lowercase; CLIP's split regex;
byte-level pieces with the "</w>" end-of-word suffix; <|startoftext|> ... <|endoftext|> around the
ids. Texts are truncated to `max_length` (77) with the two special tokens kept (BOS + 75 + EOS, as
OpenAI's `clip.tokenize(truncate=True)`) and right-padded with the pad token. This is
CLIPTokenizerFast's behaviour; the slow CLIPTokenizer additionally runs ftfy.fix_text (and OpenAI's
tokenizer also html.unescape), which only changes texts with broken unicode or HTML entities.

Image processor: transformers' CLIPImageProcessor on uint8 RGB images: resize so the shortest side is
`size` (long side int(size * long / short)) with Pillow's bicubic filter (what CLIPImageProcessor
itself calls, reducing_gap=None), center crop to `crop_size` (offset (H - h) // 2), x / 255, then
(x - mean) / std with OpenAI's mean/std, read from preprocessor_config.json when present. OpenAI's
`clip.load` preprocessing (the original Open-Sora scorers) differs only in the crop offset:
torchvision rounds (H - h) / 2 half-to-even, so when H - h is odd the crop can sit one pixel lower
or further right.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer pattern (transformers' CLIPConverter; the slow tokenizer's regex without the
# special tokens, which the added-token pass splits off first)
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The slow CLIPTokenizer reads at most this many merges (OpenAI's 49152-token vocabulary minus the
# 256 byte symbols and the 2 special tokens)
MAX_MERGES = 49152 - 256 - 2


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json / special_tokens_map.json store it (str or {"content"})."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class CLIPTokenizer:
    """texts -> (input_ids int32 [B, max_length], attention_mask int32 [B, max_length])."""

    def __init__(self, tokenizer, max_length: int, bos_token: str = BOS, eos_token: str = EOS,
                 pad_token: str = EOS, source: str = ""):
        self.tokenizer, self.max_length, self.source = tokenizer, int(max_length), source
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (self._id(t) for t in (bos_token, eos_token,
                                                                                         pad_token))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_length)
        tokenizer.enable_padding(direction="right", length=self.max_length, pad_id=self.pad_token_id,
                                 pad_token=pad_token)

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.source}: the vocabulary has no token {token!r}")
        return int(i)

    @classmethod
    def from_folder(cls, folder, max_length: int = 77) -> "CLIPTokenizer":
        """From tokenizer.json, else vocab.json + merges.txt; special tokens from special_tokens_map.json /
        tokenizer_config.json (defaults: <|startoftext|>, <|endoftext|>, pad = <|endoftext|>)."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        config = {**_read_json(folder / "tokenizer_config.json"), **_read_json(folder / "special_tokens_map.json")}
        bos = _token_text(config.get("bos_token")) or BOS
        eos = _token_text(config.get("eos_token")) or EOS
        pad = _token_text(config.get("pad_token")) or eos
        unk = _token_text(config.get("unk_token")) or eos
        if (folder / "tokenizer.json").is_file():
            path = folder / "tokenizer.json"
            tok = Tokenizer.from_file(str(path))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            path = folder / "vocab.json"
            tok = build_bpe(folder / "vocab.json", folder / "merges.txt", bos, eos, unk, pad)
        else:
            raise FileNotFoundError(f"{folder}: no CLIP tokenizer (expected tokenizer.json, or vocab.json and "
                                    "merges.txt, as in the Hugging Face folder)")
        return cls(tok, max_length, bos, eos, pad, str(path))

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.tokenizer.encode_batch([str(t) for t in texts])
        ids = np.array([e.ids for e in encodings], np.int32).reshape(len(encodings), self.max_length)
        mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(ids.shape)
        return ids, mask


def build_bpe(vocab_file: Path, merges_file: Path, bos: str = BOS, eos: str = EOS, unk: str = EOS,
              pad: str = EOS):
    """A `tokenizers.Tokenizer` for a CLIP vocab.json + merges.txt, assembled as transformers'
    CLIPConverter assembles CLIPTokenizerFast."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    lines = Path(merges_file).read_text(encoding="utf-8").strip().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split()) for line in lines[:MAX_MERGES] if line.strip()]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{merges_file}: lines that are not a pair of symbols, e.g. {bad[0]}")
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for name, token in (("bos", bos), ("eos", eos)):
        if token not in vocab:
            raise ValueError(f"{vocab_file}: no {name} token {token!r} in the vocabulary")
    tok.post_processor = processors.RobertaProcessing(sep=(eos, vocab[eos]), cls=(bos, vocab[bos]),
                                                      add_prefix_space=False, trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys((bos, eos, unk, pad)) if t in vocab])
    return tok


class CLIPImageProcessor:
    """uint8 RGB images [H, W, 3] (any sizes) -> pixel_values float32 [N, 3, crop_h, crop_w]."""

    def __init__(self, size=224, crop_size=224, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                 resample: int = 3, do_resize: bool = True, do_center_crop: bool = True, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True):
        self.size = size  # int (shortest edge) or (height, width)
        self.crop_size = (int(crop_size), int(crop_size)) if np.ndim(crop_size) == 0 else tuple(int(v) for v in crop_size)
        self.mean = np.asarray(image_mean, np.float32)
        self.std = np.asarray(image_std, np.float32)
        self.resample = int(resample)
        self.do_resize, self.do_center_crop = bool(do_resize), bool(do_center_crop)
        self.do_rescale, self.rescale_factor, self.do_normalize = bool(do_rescale), float(rescale_factor), bool(do_normalize)

    @classmethod
    def from_folder(cls, folder, image_size: int = 224) -> "CLIPImageProcessor":
        """From preprocessor_config.json (CLIPImageProcessor's keys); without one, CLIP's defaults at the
        model's `image_size`."""
        d = _read_json(Path(folder) / "preprocessor_config.json")
        size = d.get("size", image_size)
        if isinstance(size, dict):
            size = size["shortest_edge"] if "shortest_edge" in size else (int(size["height"]), int(size["width"]))
        crop = d.get("crop_size", image_size)
        if isinstance(crop, dict):
            crop = (int(crop["height"]), int(crop["width"]))
        return cls(size=size, crop_size=crop, image_mean=d.get("image_mean", OPENAI_CLIP_MEAN),
                   image_std=d.get("image_std", OPENAI_CLIP_STD), resample=d.get("resample", 3),
                   do_resize=d.get("do_resize", True), do_center_crop=d.get("do_center_crop", True),
                   do_rescale=d.get("do_rescale", True), rescale_factor=d.get("rescale_factor", 1 / 255),
                   do_normalize=d.get("do_normalize", True))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize."""
        if not np.ndim(self.size) == 0:
            return int(self.size[0]), int(self.size[1])
        s = int(self.size)
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(s * long / short)
        return (new_long, s) if width <= height else (s, new_long)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """One uint8 image [H, W, 3] (or [H, W]) -> float32 [3, h, w]."""
        from PIL import Image

        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f"CLIPImageProcessor expects uint8 images, got {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"CLIPImageProcessor expects RGB images [H, W, 3], got shape {image.shape}")
        if self.do_resize:
            h, w = self.output_size(*image.shape[:2])
            image = np.asarray(Image.fromarray(image).resize((w, h), resample=self.resample, reducing_gap=None))
        if self.do_center_crop:
            image = center_crop(image, self.crop_size)
        x = image.astype(np.float64) * self.rescale_factor if self.do_rescale else image
        x = x.astype(np.float32)
        if self.do_normalize:
            x = (x - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # [H, W, 3] -> [3, H, W]

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, 3, *self.crop_size), np.float32)
        return np.stack([self.preprocess(im) for im in images])


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, C] -> [h, w, C] from offset ((H - h) // 2, (W - w) // 2); an image smaller than the crop is
    first padded with zeros, centred (transformers' center_crop)."""
    ch, cw = size
    h, w = image.shape[:2]
    if h < ch or w < cw:
        nh, nw = max(h, ch), max(w, cw)
        padded = np.zeros((nh, nw) + image.shape[2:], image.dtype)
        top, left = -(-(nh - h) // 2), -(-(nw - w) // 2)
        padded[top:top + h, left:left + w] = image
        image, h, w = padded, nh, nw
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top:top + ch, left:left + cw]
