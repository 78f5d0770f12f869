"""Caption cleaning of PixArt / Open-Sora (`clean_caption`, `text_preprocessing`) for free text.

The same steps in the same order as the original, with the same libraries: BeautifulSoup (`html.parser`) strips
HTML, ftfy repairs text (both are dependencies of this project).
"""
from __future__ import annotations

import html
import re
import urllib.parse

import ftfy
from bs4 import BeautifulSoup


def html_text(text: str) -> str:
    return BeautifulSoup(text, features="html.parser").text


def fix_text(text: str) -> str:
    return ftfy.fix_text(text)


# ================================================================
# clean_caption
# ================================================================

_URL_PATTERNS = [
    r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",
    r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",
]
_CJK_RANGES = ["\u31c0-\u31ef", "\u31f0-\u31ff", "\u3200-\u32ff", "\u3300-\u33ff", "\u3400-\u4dbf",
               "\u4dc0-\u4dff", "\u4e00-\u9fff"]  # strokes, katakana ext., enclosed, compat., ideographs
_DASHES = (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
           r"\uFE31\uFE32\uFE58\uFE63\uFF0D]+")
_BAD_PUNCT = r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}"
_DASH_OR_UNDERSCORE = re.compile(r"(?:\-|\_)")

# (pattern, replacement) applied in order; the first block runs after the HTML stripping,
# the second after basic_clean (ftfy + double html.unescape).
_BEFORE_BASIC_CLEAN = [
    (r"@[\w\d]+\b", ""),  # @nickname
    *[(f"[{r}]+", "") for r in _CJK_RANGES],
    (_DASHES, "-"),  # all kinds of dash
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # ip addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", r'"'),
    (r"[\.]{2,}", r" "),
    (_BAD_PUNCT, r" "),  # ***AUSVERKAUFT***, #AUSVERKAUFT
    (r"\s+\.\s+", r" "),
]
_AFTER_BASIC_CLEAN = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # 1920x1080 (latin x, cyrillic х, ×)
    (r"\b\s+\:\s+", r": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", r""),
    (r"[\'\_,\-\:\-\+]$", r""),
    (r"^\.\S+$", ""),
]
_BEFORE_BASIC_CLEAN = [(re.compile(p), r) for p, r in _BEFORE_BASIC_CLEAN]
_AFTER_BASIC_CLEAN = [(re.compile(p), r) for p, r in _AFTER_BASIC_CLEAN]


def basic_clean(text: str) -> str:
    text = fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def clean_caption(caption) -> str:
    """One pass of PixArt's caption cleaning (lower-case, no URLs / HTML / handles / CJK / ids /
    file names / shop boilerplate, normalised dashes, quotes and whitespace)."""
    caption = urllib.parse.unquote_plus(str(caption))
    caption = caption.strip().lower()
    caption = re.sub("<person>", "person", caption)
    for pattern in _URL_PATTERNS:
        caption = re.sub(pattern, "", caption)
    caption = html_text(caption)
    for pattern, repl in _BEFORE_BASIC_CLEAN:
        caption = pattern.sub(repl, caption)
    if len(_DASH_OR_UNDERSCORE.findall(caption)) > 3:  # this-is-my-cute-cat / this_is_my_cute_cat
        caption = _DASH_OR_UNDERSCORE.sub(" ", caption)
    caption = basic_clean(caption)
    for pattern, repl in _AFTER_BASIC_CLEAN:
        caption = pattern.sub(repl, caption)
    return caption.strip()


def text_preprocessing(text: str) -> str:
    """What the T5 embedder applies to prompts: clean_caption twice, as in PixArt's training."""
    return clean_caption(clean_caption(text))
