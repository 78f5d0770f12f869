"""Named resolutions and their aspect-ratio tables (Open-Sora 1.1).

`ASPECT_RATIOS[name] = (num_pixels, table)`, each table mapping an aspect-ratio key "h/w" (a string, as
the original spells it: "0.56", "1.00", "0.5") to the frame size (H, W) in pixels trained for it. The
numbers are the original v1.1.0 tables, stored here as data:

- the ten 17-entry "p" tables (144p ... 4k) share the keys of `P_KEYS` (h/w = 3/8, 9/21, 0.48, 1/2, 9/17,
  1/1.85, 9/16, 5/8, 2/3, 3/4, 1, 4/3, 3/2, 16/9, 17/9, 2, 1/0.48). The original's even-rounding rule
  (h = sqrt(pixels * ar) rounded to an even number, w = h / ar likewise) reproduces 360p, 720p, 1080p
  and 4k exactly and 240p / 480p except 3 entries (240p 0.67, 480p 0.48 and 1.33 keep an odd width);
  144p follows plain floor rounding instead (13 of its 17 entries differ from the even rule). The data
  is the reference, not the rule.
- the 4k table lists "0.62" before "0.56" (the original's order; it decides ties in
  `get_closest_ratio`, which takes the first key at the smallest distance).
- "256" / "512" / "1024" are PixArt's 40-entry tables; "512" and "1024" are exactly 2x and 4x "256".

Open-Sora 1.2 names aspect ratios "H:W" (`ASPECT_RATIO_MAP`: "9:16" -> "0.56", i.e. 240 x 426 at 240p,
a landscape frame); `get_image_size` accepts those names as well as the table keys. The 1.2-only
resolutions ("2k", "2048", "2880") are not here: no 1.1 recipe or released 1.1 weight uses them.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np

# ----------------------------------------------------------------------------- the tables
P_KEYS = ("0.38", "0.43", "0.48", "0.50", "0.53", "0.54", "0.56", "0.62", "0.67", "0.75",
          "1.00", "1.33", "1.50", "1.78", "1.89", "2.00", "2.08")
_P_KEYS_4K = P_KEYS[:6] + ("0.62", "0.56") + P_KEYS[8:]  # the original's order for 4k

# (H, W) in the order of P_KEYS
_P_SIZES = {
    "144p": (36864, [(117, 312), (125, 291), (133, 277), (135, 270), (139, 262), (141, 260), (144, 256),
                     (151, 241), (156, 234), (166, 221), (192, 192), (221, 165), (235, 156), (256, 144),
                     (263, 139), (271, 135), (277, 132)]),
    "240p": (102240, [(196, 522), (210, 490), (222, 462), (226, 452), (232, 438), (236, 436), (240, 426),
                      (252, 404), (262, 393), (276, 368), (320, 320), (370, 278), (392, 262), (426, 240),
                      (440, 232), (452, 226), (462, 222)]),
    "360p": (230400, [(294, 784), (314, 732), (332, 692), (340, 680), (350, 662), (352, 652), (360, 640),
                      (380, 608), (392, 588), (416, 554), (480, 480), (554, 416), (588, 392), (640, 360),
                      (660, 350), (678, 340), (692, 332)]),
    "480p": (409920, [(392, 1046), (420, 980), (444, 925), (452, 904), (466, 880), (470, 870), (480, 854),
                      (506, 810), (522, 784), (554, 738), (640, 640), (740, 555), (784, 522), (854, 480),
                      (880, 466), (906, 454), (924, 444)]),
    "720p": (921600, [(588, 1568), (628, 1466), (666, 1388), (678, 1356), (698, 1318), (706, 1306),
                      (720, 1280), (758, 1212), (784, 1176), (832, 1110), (960, 960), (1108, 832),
                      (1176, 784), (1280, 720), (1320, 698), (1358, 680), (1386, 666)]),
    "1080p": (2073600, [(882, 2352), (942, 2198), (998, 2080), (1018, 2036), (1048, 1980), (1058, 1958),
                        (1080, 1920), (1138, 1820), (1176, 1764), (1248, 1664), (1440, 1440), (1662, 1246),
                        (1764, 1176), (1920, 1080), (1980, 1048), (2036, 1018), (2078, 998)]),
    "4k": (8294400, [(1764, 4704), (1886, 4400), (1996, 4158), (2036, 4072), (2096, 3960), (2118, 3918),
                     (2160, 3840), (2276, 3642), (2352, 3528), (2494, 3326), (2880, 2880), (3326, 2494),
                     (3528, 2352), (3840, 2160), (3958, 2096), (4072, 2036), (4156, 1994)]),
}

PIXART_KEYS = ("0.25", "0.26", "0.27", "0.28", "0.32", "0.33", "0.35", "0.4", "0.42", "0.48", "0.5", "0.52",
               "0.57", "0.6", "0.68", "0.72", "0.78", "0.82", "0.88", "0.94", "1.0", "1.07", "1.13", "1.21",
               "1.29", "1.38", "1.46", "1.67", "1.75", "2.0", "2.09", "2.4", "2.5", "2.89", "3.0", "3.11",
               "3.62", "3.75", "3.88", "4.0")
# "256" in the order of PIXART_KEYS; "512" / "1024" are these sizes times 2 / 4
_PIXART_256 = [(128, 512), (128, 496), (128, 480), (128, 464), (144, 448), (144, 432), (144, 416), (160, 400),
               (160, 384), (176, 368), (176, 352), (176, 336), (192, 336), (192, 320), (208, 304), (208, 288),
               (224, 288), (224, 272), (240, 272), (240, 256), (256, 256), (256, 240), (272, 240), (272, 224),
               (288, 224), (288, 208), (304, 208), (320, 192), (336, 192), (352, 176), (368, 176), (384, 160),
               (400, 160), (416, 144), (432, 144), (448, 144), (464, 128), (480, 128), (496, 128), (512, 128)]


def _p_table(name: str) -> dict[str, tuple[int, int]]:
    sizes = dict(zip(P_KEYS, _P_SIZES[name][1]))
    order = _P_KEYS_4K if name == "4k" else P_KEYS
    return {k: sizes[k] for k in order}


def _pixart_table(factor: int) -> dict[str, tuple[int, int]]:
    return {k: (h * factor, w * factor) for k, (h, w) in zip(PIXART_KEYS, _PIXART_256)}


# name -> (num_pixels, {"h/w": (H, W)}), in the original's order (ascending pixel count)
ASPECT_RATIOS: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {
    "144p": (36864, _p_table("144p")),
    "256": (65536, _pixart_table(1)),
    "240p": (102240, _p_table("240p")),
    "360p": (230400, _p_table("360p")),
    "512": (262144, _pixart_table(2)),
    "480p": (409920, _p_table("480p")),
    "720p": (921600, _p_table("720p")),
    "1024": (1048576, _pixart_table(4)),
    "1080p": (2073600, _p_table("1080p")),
    "4k": (8294400, _p_table("4k")),
}

# The resolutions the Open-Sora 1.1 stage configs train (their bucket_config keys, stages 1-3 together:
# 1080p only as images in stage 2). 4k is a table no 1.1 run trained.
TRAINED_RESOLUTIONS = ("144p", "256", "240p", "360p", "512", "480p", "720p", "1024", "1080p")

# Open-Sora 1.2's "H:W" names of the 17 "p" keys (height first: "9:16" is the 0.56 = landscape entry).
ASPECT_RATIO_MAP = {
    "3:8": "0.38", "9:21": "0.43", "12:25": "0.48", "1:2": "0.50", "9:17": "0.53", "27:50": "0.54",
    "9:16": "0.56", "5:8": "0.62", "2:3": "0.67", "3:4": "0.75", "1:1": "1.00", "4:3": "1.33",
    "3:2": "1.50", "16:9": "1.78", "17:9": "1.89", "2:1": "2.00", "50:27": "2.08",
}


# ----------------------------------------------------------------------------- lookups
def get_num_pixels(resolution: str) -> int:
    return _resolution(resolution)[0]


def get_table(resolution: str) -> dict[str, tuple[int, int]]:
    """The aspect-ratio table {"h/w": (H, W)} of a named resolution."""
    return _resolution(resolution)[1]


def _resolution(resolution) -> tuple[int, dict[str, tuple[int, int]]]:
    name = str(resolution)
    if name not in ASPECT_RATIOS:
        raise KeyError(f"unknown resolution {resolution!r}: expected one of {list(ASPECT_RATIOS)}")
    return ASPECT_RATIOS[name]


def get_closest_ratio(height: float, width: float, ratios: dict) -> str:
    """The key of `ratios` nearest to height / width (|float(key) - H/W| smallest; the first such key
    in the table's order on a tie)."""
    ar = height / width
    return min(ratios.keys(), key=lambda k: abs(float(k) - ar))


def _ratio_value(aspect_ratio: Union[str, float, int]) -> tuple[float, str]:
    """(h/w value, how it was named) of "9:16" (H:W), "0.56" (a key) or a number."""
    if isinstance(aspect_ratio, (int, float)) and not isinstance(aspect_ratio, bool):
        return float(aspect_ratio), repr(aspect_ratio)
    text = str(aspect_ratio).strip()
    if text in ASPECT_RATIO_MAP:
        return float(ASPECT_RATIO_MAP[text]), text
    if ":" in text:
        h, _, w = text.partition(":")
        try:
            return int(h) / int(w), text
        except (ValueError, ZeroDivisionError):
            pass
    else:
        try:
            return float(text), text
        except ValueError:
            pass
    raise ValueError(f"aspect ratio {aspect_ratio!r} is neither an 'H:W' name ({', '.join(ASPECT_RATIO_MAP)}) "
                     "nor a height/width number such as 0.56")


def get_image_size(resolution: str, aspect_ratio: Union[str, float, int]) -> tuple[int, int]:
    """(H, W) in pixels of `resolution` ("240p", "256", ...) at `aspect_ratio`: an "H:W" name of
    Open-Sora 1.2 ("9:16" -> key "0.56" -> (240, 426) at 240p), a table key ("0.56", "1.0") or its
    value (0.56, 1). The ratio must be one of the table's keys (by value, so "1:1" finds "1.0" in the
    PixArt tables); otherwise a ValueError names the nearest key - a size between table entries was
    never trained."""
    table = get_table(resolution)
    value, named = _ratio_value(aspect_ratio)
    for key, size in table.items():
        if math.isclose(float(key), value, rel_tol=0.0, abs_tol=1e-9):
            return size
    nearest = get_closest_ratio(value, 1.0, table)
    raise ValueError(f"aspect ratio {named} (h/w = {value:.4g}) is not in the {resolution} table; the nearest "
                     f"entry is {nearest!r} = {table[nearest]} (H, W). Keys: {list(table)}")


def find_table_entry(height: int, width: int, resolutions=TRAINED_RESOLUTIONS) -> Optional[tuple[str, str]]:
    """(resolution, key) of the first table among `resolutions` with an entry exactly (height, width),
    else None."""
    for name in resolutions:
        for key, size in get_table(name).items():
            if size == (int(height), int(width)):
                return name, key
    return None


def untrained_size_warning(height: int, width: int) -> Optional[str]:
    """None for a size in the trained tables (`TRAINED_RESOLUTIONS`), else one line for the log naming
    the nearest trained size (smallest log(h/H)^2 + log(w/W)^2 over every trained entry)."""
    if find_table_entry(height, width) is not None:
        return None
    best = None
    for name in TRAINED_RESOLUTIONS:
        for h, w in get_table(name).values():
            score = math.log(h / height) ** 2 + math.log(w / width) ** 2
            if best is None or score < best[0]:
                best = (score, name, h, w)
    _, name, h, w = best
    return (f"image size {height}x{width} is not a trained Open-Sora 1.1 size (the models are trained only on "
            f"the aspect-ratio tables; other sizes often give noise); the nearest trained size is {h}x{w} "
            f"({name})")


def as_size(image_size) -> tuple[int, int]:
    """image_size (an int, or [H, W]) -> (H, W)."""
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    h, w = (int(v) for v in image_size)
    return h, w
