"""Named resolutions and aspect-ratio tables against the sample entries of SPEC-1.1 §1.2 (hand-copied
there from the original v1.1.0 file); the full tables were compared entry by entry outside the suite."""
from __future__ import annotations

import pytest

from opensora.data.aspect import (ASPECT_RATIO_MAP, ASPECT_RATIOS, P_KEYS, PIXART_KEYS, TRAINED_RESOLUTIONS,
                                  find_table_entry, get_closest_ratio, get_image_size, get_num_pixels,
                                  get_table, untrained_size_warning)

# SPEC-1.1 §1.2: name -> (pixels, number of entries, sample entries)
SPEC = {
    "144p": (36864, 17, {"0.38": (117, 312), "0.56": (144, 256), "1.00": (192, 192), "1.33": (221, 165),
                         "1.78": (256, 144), "2.08": (277, 132)}),
    "256": (65536, 40, {"0.25": (128, 512), "0.5": (176, 352), "0.57": (192, 336), "1.0": (256, 256),
                        "1.75": (336, 192), "4.0": (512, 128)}),
    "240p": (102240, 17, {"0.38": (196, 522), "0.56": (240, 426), "0.75": (276, 368), "1.00": (320, 320),
                          "1.33": (370, 278), "1.78": (426, 240), "2.08": (462, 222), "0.67": (262, 393)}),
    "360p": (230400, 17, {"0.38": (294, 784), "0.56": (360, 640), "0.75": (416, 554), "1.00": (480, 480),
                          "1.78": (640, 360)}),
    "512": (262144, 40, {"0.25": (256, 1024), "0.57": (384, 672), "1.0": (512, 512), "1.75": (672, 384),
                         "4.0": (1024, 256)}),
    "480p": (409920, 17, {"0.38": (392, 1046), "0.56": (480, 854), "0.75": (554, 738), "1.00": (640, 640),
                          "1.33": (740, 555), "1.78": (854, 480)}),
    "720p": (921600, 17, {"0.38": (588, 1568), "0.56": (720, 1280), "0.75": (832, 1110), "1.00": (960, 960),
                          "1.33": (1108, 832), "1.78": (1280, 720)}),
    "1024": (1048576, 40, {"0.25": (512, 2048), "0.57": (768, 1344), "1.0": (1024, 1024), "4.0": (2048, 512)}),
    "1080p": (2073600, 17, {"0.56": (1080, 1920), "1.00": (1440, 1440), "1.78": (1920, 1080)}),
    "4k": (8294400, 17, {"0.56": (2160, 3840), "1.00": (2880, 2880)}),
}


def test_tables_match_spec():
    assert list(ASPECT_RATIOS) == ["144p", "256", "240p", "360p", "512", "480p", "720p", "1024", "1080p", "4k"]
    for name, (pixels, count, samples) in SPEC.items():
        got_pixels, table = ASPECT_RATIOS[name]
        assert got_pixels == pixels == get_num_pixels(name), name
        assert len(table) == count, name
        for key, size in samples.items():
            assert table[key] == size, (name, key)
        assert set(table) == set(P_KEYS if count == 17 else PIXART_KEYS), name
        assert all(isinstance(h, int) and isinstance(w, int) for h, w in table.values())
    # the odd entries SPEC names; the base entries are the named size exactly
    assert get_table("480p")["1.33"] == (740, 555) and get_table("240p")["0.67"] == (262, 393)
    assert get_table("144p")["0.38"] == (117, 312)
    for name, (h, w) in {"144p": (144, 256), "240p": (240, 426), "360p": (360, 640), "480p": (480, 854),
                         "720p": (720, 1280), "1080p": (1080, 1920), "4k": (2160, 3840)}.items():
        assert get_table(name)["0.56"] == (h, w)  # the base entry is the named size
        if name in ("144p", "360p", "720p", "1080p", "4k"):
            assert get_num_pixels(name) == h * w
    # PixArt tables are multiples of 16 / 32 / 64; 14-16 of 17 "p" entries are not multiples of 16
    for name, m in (("256", 16), ("512", 32), ("1024", 64)):
        assert all(h % m == 0 and w % m == 0 for h, w in get_table(name).values())
    not16 = [sum(h % 16 or w % 16 for h, w in get_table(n).values()) > 0 for n in ("144p", "240p", "480p")]
    assert all(not16)
    assert 14 <= sum(bool(h % 16 or w % 16) for h, w in get_table("240p").values()) <= 16
    # 4k keeps the original's key order ("0.62" before "0.56")
    keys4k = list(get_table("4k"))
    assert keys4k.index("0.62") == keys4k.index("0.56") - 1


def test_closest_ratio():
    t240 = get_table("240p")
    assert get_closest_ratio(720, 1280, t240) == "0.56"
    assert get_closest_ratio(1080, 1920, get_table("512")) == "0.57"
    assert get_closest_ratio(1024, 1024, get_table("256")) == "1.0"
    assert get_closest_ratio(1920, 1080, t240) == "1.78"
    assert get_closest_ratio(100, 1000, t240) == "0.38"  # beyond the table: the extreme key
    # a tie goes to the first key in the table's order
    assert get_closest_ratio(1.0, 1.0, {"0.5": (1, 2), "1.5": (3, 2)}) == "0.5"
    assert get_closest_ratio(1.0, 1.0, {"1.5": (3, 2), "0.5": (1, 2)}) == "1.5"


def test_image_size_names_keys_and_numbers():
    assert get_image_size("240p", "9:16") == (240, 426)  # H:W names as Open-Sora 1.2: 9:16 is landscape
    assert get_image_size("240p", "16:9") == (426, 240)
    assert get_image_size("720p", "0.56") == (720, 1280)
    assert get_image_size("480p", 1) == (640, 640) == get_image_size("480p", "1:1") == get_image_size("480p", 1.0)
    assert get_image_size("256", "1:1") == (256, 256)  # "1.00" is found by value as "1.0"
    assert get_image_size("512", "0.57") == (384, 672) == get_image_size("512", 0.57)
    assert get_image_size("144p", "3:8") == (117, 312)
    assert len(ASPECT_RATIO_MAP) == 17 and set(ASPECT_RATIO_MAP.values()) == set(P_KEYS)
    with pytest.raises(ValueError, match=r"not in the 256 table; the nearest entry is '0.57'"):
        get_image_size("256", "9:16")
    with pytest.raises(KeyError, match=r"unknown resolution '300p'.*'144p'"):
        get_image_size("300p", "9:16")
    with pytest.raises(ValueError, match="neither an 'H:W' name"):
        get_image_size("240p", "wide")
    with pytest.raises(ValueError, match="not in the 240p table"):
        get_image_size("240p", "16:10")


def test_trained_sizes():
    assert find_table_entry(240, 426) == ("240p", "0.56")
    assert find_table_entry(1024, 1024) == ("1024", "1.0")
    assert find_table_entry(2160, 3840) is None  # 4k: a table, but no 1.1 stage trained it
    assert find_table_entry(2160, 3840, resolutions=list(ASPECT_RATIOS)) == ("4k", "0.56")
    assert "4k" not in TRAINED_RESOLUTIONS and len(TRAINED_RESOLUTIONS) == 9
    assert untrained_size_warning(240, 426) is None and untrained_size_warning(276, 368) is None
    msg = untrained_size_warning(240, 428)
    assert msg is not None and "\n" not in msg and "240x428" in msg and "240x426 (240p)" in msg
    assert "256x256 (256)" in untrained_size_warning(250, 250)
