"""Motion of a clip from OpenCV's Farneback dense optical flow: the camera-motion label and a flow score.

Camera motion (Open-Sora 1.1's tools/caption/camera_motion_detect.py, thresholds as there): the grey
frames 0, 15, 30, ... (`frame_interval`) are compared pair by pair with Farneback (pyramid scale 0.5,
3 levels, window 15, 3 iterations, poly_n 5, poly_sigma 1.2). Each pair is labelled from the median
flow magnitude (px), the median flow angle (degrees, image axes: 0 = content moving right) and the
zoom-in factor (the fraction of pixels that the flow carries no closer to the frame centre):

    magnitude < tau_static (1.0)          static
    zoom-in factor < tau_zoom[0] (0.4)    zoom out
    zoom-in factor > tau_zoom[1] (0.6)    zoom in
    angle in [315, 45)                    pan left   (the content moves right)
    angle in [45, 135)                    tilt up    (the content moves down)
    angle in [135, 225)                   pan right
    angle in [225, 315)                   tilt down

and the clip gets the label of more than half of its pairs (an image: "unknown", no pair); without such a
majority: "unknown" if some pair was static, else "pan/tilt" if no pair zoomed, else "dynamic". Two
deliberate differences from the original: it compares every sampled frame with frame 0 (its `prvs` is
never updated), so the displacement grows along the clip and Farneback loses track of it (a 0.3 px/frame
pan on 64 x 48 frames reads as a zoom from the second pair on); here each frame is compared with the
previous sampled one (`reference="previous"`; "first" is the original's). And a clip with fewer than two
sampled frames (under frame_interval + 1 frames) is "unknown", where the original's empty vote says
"pan/tilt". Frames are decoded with decord (the loader's reader) instead of OpenCV's VideoCapture.

Flow score (`flow`): the quantity of Open-Sora 1.1's tools/scoring/optical_flow scorer - frames
0, 10, 20, 30 (indices past the end clamped to the last frame), a portrait frame transposed to landscape,
resized to 320 x 576 (bilinear, corners aligned, as torch's interpolate(align_corners=True)), the mean
absolute flow component over the three consecutive pairs - but with Farneback (same parameters as
above, on the grey frames) instead of the UniMatch network the original runs, so it needs no weights.
Its values are in pixels of the 320 x 576 frame like the original's, but they are NOT comparable with
the original's `flow` numbers (another estimator): choose `flowmin` thresholds on this score's own values.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

CMOTION_LABELS = ("static", "zoom in", "zoom out", "pan left", "pan right", "tilt up", "tilt down", "pan/tilt",
                  "dynamic", "unknown")
# cv2.calcOpticalFlowFarneback(prev, next, None, pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags)
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)
FLOW_FRAMES = (0, 10, 20, 30)
FLOW_SIZE = (320, 576)  # (H, W) the original's UniMatch input


def farneback(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Dense flow [H, W, 2] (dx, dy in px) from grey frame `prev` [H, W] to `nxt`."""
    import cv2

    return cv2.calcOpticalFlowFarneback(prev, nxt, None, *FARNEBACK)


def grey(frames: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] RGB uint8 -> [N, H, W] grey (OpenCV's BT.601 weights), the input Farneback reads."""
    import cv2

    return np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames])


# ================================================================
# Camera motion
# ================================================================


def zoom_in_factor(flow: np.ndarray) -> float:
    """Fraction of pixels whose flow-carried position is at least as far from the frame centre (W/2, H/2)
    as the pixel itself (zero flow counts: the original's `>=`)."""
    h, w = flow.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    before = np.hypot(xs - w / 2, ys - h / 2)
    after = np.hypot(xs + flow[..., 0] - w / 2, ys + flow[..., 1] - h / 2)
    return float(np.count_nonzero(after >= before)) / before.size


def pair_motion(magnitude: float, angle: float, zoom_in: float, tau_static: float = 1.0,
                tau_zoom: Sequence[float] = (0.4, 0.6)) -> str:
    """The label of one frame pair from its median magnitude, median angle and zoom-in factor."""
    if magnitude < tau_static:
        return "static"
    if zoom_in < tau_zoom[0]:
        return "zoom out"
    if zoom_in > tau_zoom[1]:
        return "zoom in"
    if angle < 45 or angle >= 315:
        return "pan left"
    if 45 <= angle < 135:
        return "tilt up"
    if 135 <= angle < 225:
        return "pan right"
    if 225 <= angle < 315:
        return "tilt down"
    return "unknown"  # NaN angle


def vote(pair_labels: Sequence[str]) -> str:
    """The clip's label: the label of more than half of the pairs (the first to reach the top count),
    else "unknown" when a pair was static, "pan/tilt" when none zoomed, "dynamic" otherwise; "unknown"
    without pairs."""
    if not pair_labels:
        return "unknown"
    counts: dict = {}
    best, best_count = None, 0
    for label in pair_labels:
        counts[label] = counts.get(label, 0) + 1
        if counts[label] > best_count:
            best, best_count = label, counts[label]
    if best_count > len(pair_labels) / 2:
        return best
    if "static" in counts:
        return "unknown"
    if "zoom in" not in counts and "zoom out" not in counts:
        return "pan/tilt"
    return "dynamic"


def pair_statistics(prev: np.ndarray, nxt: np.ndarray) -> tuple[float, float, float]:
    """(median magnitude, median angle in degrees, zoom-in factor) of the Farneback flow prev -> nxt."""
    import cv2

    flow = farneback(prev, nxt)
    mag, ang = cv2.cartToPolar(flow[..., 0], flow[..., 1], angleInDegrees=True)
    return float(np.median(mag)), float(np.median(ang)), zoom_in_factor(flow)


def _sampled_grey_frames(path: str, frame_interval: int, chunk: int = 16) -> Iterator[np.ndarray]:
    """Grey frames 0, frame_interval, 2 * frame_interval, ... of a video, decoded a few at a time."""
    from opensora.utils.video_io import open_video, read_frames

    reader = open_video(path, num_threads=1)
    indices = list(range(0, len(reader), int(frame_interval)))
    for start in range(0, len(indices), chunk):
        yield from grey(read_frames(reader, indices[start:start + chunk]))


def camera_motion(path: str, frame_interval: int = 15, tau_static: float = 1.0,
                  tau_zoom: Sequence[float] = (0.4, 0.6), reference: str = "previous") -> dict:
    """{"cmotion": label} of a video (see the module docstring); `reference` "previous" compares each sampled
    frame with the one before, "first" with frame 0 (the original's)."""
    if reference not in ("previous", "first"):
        raise ValueError(f"reference must be 'previous' or 'first', got {reference!r}")
    from opensora.data.video import is_image

    if is_image(path):
        return {"cmotion": vote([])}  # one frame: no pair
    labels, ref = [], None
    for frame in _sampled_grey_frames(path, frame_interval):
        if ref is not None:
            labels.append(pair_motion(*pair_statistics(ref, frame), tau_static=tau_static, tau_zoom=tau_zoom))
        if ref is None or reference == "previous":
            ref = frame
    return {"cmotion": vote(labels)}


# ================================================================
# Flow score
# ================================================================


def resize_align_corners(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """[H, W] float -> [size[0], size[1]] by bilinear interpolation with corner pixels aligned (torch's
    interpolate(mode="bilinear", align_corners=True)): output pixel i samples input (i * (H - 1) / (h - 1))."""
    from scipy import ndimage

    h, w = image.shape
    out = ndimage.zoom(image.astype(np.float32), (size[0] / h, size[1] / w), order=1, grid_mode=False,
                       mode="nearest", prefilter=False)
    if out.shape != tuple(size):  # zoom rounds the output shape from the factors
        raise AssertionError(f"resize to {tuple(size)} gave {out.shape}")
    return out


def flow_frames(frames: np.ndarray, size: Sequence[int] = FLOW_SIZE) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, size] float32 grey frames as the scorer reads them (portrait transposed)."""
    g = grey(frames).astype(np.float32)  # grey first: the resize is linear, so the order does not matter
    if g.shape[1] > g.shape[2]:
        g = g.transpose(0, 2, 1)  # [N, H, W] -> [N, W, H], as the original's "N C H W -> N C W H"
    return np.stack([resize_align_corners(f, size) for f in g])


def flow_score(path: str, frame_indices: Sequence[int] = FLOW_FRAMES, size: Sequence[int] = FLOW_SIZE) -> dict:
    """{"flow": mean |flow component| (px at `size`)} over consecutive pairs of `frame_indices` (0 for an
    image: every index reads its one frame)."""
    from opensora.data.video import is_image
    from opensora.utils.video_io import open_video, read_frames

    if is_image(path):
        return {"flow": 0.0}
    reader = open_video(path, num_threads=1)
    n = len(reader)
    if n < 1:
        raise ValueError("no frames")
    frames = flow_frames(read_frames(reader, [min(int(i), n - 1) for i in frame_indices]), size)
    flows = [np.abs(farneback(a, b)).mean() for a, b in zip(frames[:-1], frames[1:])]
    return {"flow": float(np.mean(flows))}
