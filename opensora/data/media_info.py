"""Measuring media files: frame count, size, aspect ratio and fps of a video or image.

The one home of these measurements (task=scan_videos and task=datautil's info use them). Videos are
measured with decord, the reader the training loader uses, so `num_frames` is the number of frames the
loader can index (decord counts the container's packets; OpenCV's CAP_PROP_FRAME_COUNT, which the
original datautil reads, is the header's estimate and can be off for some files). Images are one frame
at IMAGE_FPS, the frame rate Open-Sora 1.1's VariableVideoTextDataset gives them.
"""
from __future__ import annotations

from pathlib import Path

from opensora.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, is_image

# Open-Sora 1.1's IMG_FPS: images train as one frame with fps conditioning 120.
IMAGE_FPS = 120.0
PROBE_COLUMNS = ["num_frames", "height", "width", "fps", "aspect_ratio", "duration", "readable", "error"]


def probe(path: str, check_decode: bool = True) -> dict:
    """num_frames, height, width, fps, aspect_ratio (H / W), duration (s), readable, error of one file.

    Images have 1 frame, fps IMAGE_FPS and duration 0. With `check_decode`, a video's first and last
    frames are decoded (finds truncated files) and an image is decoded whole; otherwise only the header
    and frame 0 (for the size) of a video are read. Never raises: a failure sets readable False and error."""
    info = {"num_frames": 0, "height": 0, "width": 0, "fps": 0.0, "aspect_ratio": float("nan"), "duration": 0.0,
            "readable": False, "error": ""}
    p = Path(path)
    try:
        if not p.is_file():
            raise FileNotFoundError("file not found")
        if is_image(path):
            from opensora.data.video import read_image

            h, w = read_image(p).shape[:2] if check_decode else _image_size(p)
            info.update(num_frames=1, height=h, width=w, fps=IMAGE_FPS)
        else:
            from opensora.utils.video_io import open_video, read_frames, video_info

            reader = open_video(p, num_threads=1)
            n, fps = len(reader), float(reader.get_avg_fps())
            info.update(num_frames=n, fps=fps, duration=n / fps if fps > 0 else 0.0)  # from the header
            if n < 1:
                raise ValueError("no frames")
            meta = video_info(reader)  # decodes frame 0
            info.update(height=meta["height"], width=meta["width"])
            if check_decode:
                read_frames(reader, [0, n - 1])
            del reader
        info["aspect_ratio"] = info["height"] / info["width"] if info["width"] else float("nan")
        info["readable"] = True
    except Exception as e:  # noqa: BLE001 - any failure means unreadable
        info["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return info


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def find_media(folder: Path) -> list[str]:
    """Video and image files under `folder` (recursive), as sorted POSIX paths relative to it."""
    exts = set(VIDEO_EXTENSIONS) | set(IMAGE_EXTENSIONS)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))
