"""Caption cleaning of PixArt / Open-Sora (`clean_caption`, `text_preprocessing`) for free text.

The same steps in the same order as the original. Two steps use third-party libraries there:
  - HTML stripping (`BeautifulSoup(caption, "html.parser").text`): bs4 is used when installed,
    otherwise the stdlib `html.parser` collects the text the same way (text nodes and entities
    kept; tags, comments, <script>/<style>/<template> content dropped).
  - `ftfy.fix_text`: ftfy is used when installed, otherwise a subset of its default fixes is
    applied (terminal escapes, HTML entities when no "<", latin ligatures, character width,
    curly quotes, line breaks, control characters, NFC). Missing without ftfy: mojibake repair
    (`fix_encoding`, e.g. "Ã©" -> "é"), C1-control / lossy-UTF-8 / surrogate fixes.
A fallback in use is logged once.
"""
from __future__ import annotations

import html
import logging
import re
import unicodedata
import urllib.parse
from html.parser import HTMLParser

log = logging.getLogger(__name__)
_FALLBACK_LOGGED = set()


def _log_fallback_once(lib: str, what: str) -> None:
    if lib not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add(lib)
        log.warning("caption cleaning: %s is not installed, using %s", lib, what)


# ================================================================
# HTML text (BeautifulSoup(..., "html.parser").text)
# ================================================================


class _TextCollector(HTMLParser):
    _SKIP = {"script", "style", "template", "rt", "rp"}  # bs4 keeps these strings out of .text

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self._skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in self._SKIP and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def html_text_stdlib(text: str) -> str:
    parser = _TextCollector()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def html_text(text: str) -> str:
    try:
        from bs4 import BeautifulSoup
    except ImportError:
        _log_fallback_once("bs4", "the stdlib html.parser")
        return html_text_stdlib(text)
    return BeautifulSoup(text, features="html.parser").text


# ================================================================
# ftfy.fix_text subset
# ================================================================

_ANSI_RE = re.compile(r"\x1b\[((?:\d|;)*)([a-zA-Z])")
_LIGATURES = {ord(c): unicodedata.normalize("NFKC", c) for c in "ĲĳǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬆ"}
_LIGATURES.update({ord("ŉ"): "ʼn", ord("ﬅ"): "ſt"})
_WIDTH = {0x3000: " "}
_WIDTH.update({i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
               if unicodedata.normalize("NFKC", chr(i)) != chr(i)})
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_CONTROL = {i: None for i in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                              *range(0xFFF9, 0xFFFD)]}


def fix_text_subset(text: str) -> str:
    """ftfy.fix_text's default fixes minus the encoding (mojibake) repairs; line by line like ftfy."""
    out = []
    for line in text.splitlines(keepends=True) if "\n" in text else [text]:
        line = _ANSI_RE.sub("", line)
        if "<" not in line:
            line = html.unescape(line)
        line = line.translate(_LIGATURES).translate(_WIDTH)
        line = _SINGLE_QUOTES.sub("'", _DOUBLE_QUOTES.sub('"', line))
        line = line.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
        line = line.replace("\u0085", "\n").translate(_CONTROL)
        out.append(unicodedata.normalize("NFC", line))
    return "".join(out)


def fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        _log_fallback_once("ftfy", "a subset of ftfy.fix_text (no mojibake repair)")
        return fix_text_subset(text)
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
