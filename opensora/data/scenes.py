"""Scene detection (PySceneDetect) and cutting scenes into clips (the ffmpeg that imageio-ffmpeg ships).

Detection is Open-Sora 1.1's tools/scene_cut/scene_detect.py: PySceneDetect's AdaptiveDetector with
adaptive_threshold 3.0 (its other parameters at PySceneDetect's defaults: min_scene_len 15 frames,
window_width 2, min_content_val 15), `detect(..., start_in_scene=True)` so a video without a cut is one
scene. A video's scenes are written as the original writes them, the string of a list of (start, end)
timecodes, end exclusive: "[('00:00:00.000', '00:00:02.000'), ('00:00:02.000', '00:00:04.000')]".

Cutting is tools/scene_cut/cut.py's: per scene one ffmpeg run `-ss start -i video -t duration [-r fps]
[-vf scale]`, scenes shorter than min_seconds skipped, scenes longer than max_seconds keep their first
max_seconds, the shorter side scaled to shorter_size with the aspect ratio kept (the other side even),
clips named `{video name}_scene-{index}.mp4` (index in the video's scene list). Deliberate differences:
  - the original reads the timecodes back at 1 fps (`FrameTimecode(s, fps=1)`), which rounds every
    start and end to a whole second; here they are read at the video's fps, so a cut lands on its frame;
  - the timestamp string is parsed with ast.literal_eval, not eval;
  - only the first video stream is kept (`-map 0:v:0`, no audio; the original maps every stream, which
    fails for streams mp4 cannot hold), encoded H.264 yuv420p at crf 23 (ffmpeg's libx264 default);
  - each clip is written to a temporary name and renamed, so a kill never leaves a half clip behind, and
    an ffmpeg failure is an error for that video (the original ignores ffmpeg's exit status);
  - `upscale=False` (a setting; the original always scales) only ever shrinks.
"""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path
from typing import Optional, Sequence

Scene = tuple[str, str]


def detect_scenes(path: str, adaptive_threshold: float = 3.0, min_scene_len: int = 15,
                  start_in_scene: bool = True) -> list[Scene]:
    """[(start, end)] timecodes 'HH:MM:SS.mmm' of the scenes of a video (end exclusive)."""
    from scenedetect import AdaptiveDetector, detect

    from opensora.data.video import is_image

    if is_image(str(path)):
        raise ValueError("an image, not a video: images need no scene detection or cutting (keep them in a CSV of "
                         "their own and merge it with task=datautil)")
    detector = AdaptiveDetector(adaptive_threshold=float(adaptive_threshold), min_scene_len=int(min_scene_len))
    scenes = detect(str(path), detector, start_in_scene=bool(start_in_scene))
    return [(start.get_timecode(), end.get_timecode()) for start, end in scenes]


def scene_timestamp(path: str, adaptive_threshold: float = 3.0, min_scene_len: int = 15,
                    start_in_scene: bool = True) -> dict:
    """{"timestamp": the `timestamp` cell} of a video."""
    return {"timestamp": format_timestamp(detect_scenes(path, adaptive_threshold, min_scene_len, start_in_scene))}


def format_timestamp(scenes: Sequence[Scene]) -> str:
    """The `timestamp` cell of a video, as the original writes it (str of a list of tuples)."""
    return str([tuple(s) for s in scenes])


def parse_timestamp(cell) -> list[Scene]:
    """A `timestamp` cell -> [(start, end)]; raises ValueError for anything but a list of string pairs."""
    text = str(cell).strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"timestamp {text[:80]!r} is not a list of (start, end) timecodes") from e
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(t, str) for t in s) for s in value):
        raise ValueError(f"timestamp {text[:80]!r} is not a list of (start, end) timecodes")
    return [(str(a), str(b)) for a, b in value]


def timecode_frames(timecode: str, fps: float) -> int:
    """A timecode 'HH:MM:SS.mmm' -> the frame it falls on at `fps` (PySceneDetect's FrameTimecode)."""
    from scenedetect import FrameTimecode

    return int(FrameTimecode(timecode, fps=float(fps)).frame_num)


def plan_cuts(scenes: Sequence[Scene], fps: float, min_seconds: Optional[float] = None,
              max_seconds: Optional[float] = None) -> list[tuple[int, int, int]]:
    """[(scene index, start frame, number of frames)] of the clips to cut: scenes shorter than min_seconds
    skipped, longer ones cut to their first round(fps * max_seconds) frames."""
    if fps <= 0:
        raise ValueError(f"fps {fps} is not positive")
    plan = []
    for idx, (start, end) in enumerate(scenes):
        s, e = timecode_frames(start, fps), timecode_frames(end, fps)
        n = e - s
        if n <= 0 or (min_seconds is not None and n / fps < float(min_seconds)):
            continue
        if max_seconds is not None:
            n = min(n, int(round(fps * float(max_seconds))))
        plan.append((idx, s, n))
    return plan


def scale_filter(shorter_size: Optional[int], upscale: bool = True) -> str:
    """The -vf filter: the shorter side to `shorter_size` (even), the other side by the aspect ratio rounded
    to even (ffmpeg's -2), as the original; `upscale=False` never enlarges. Without a size, an odd side
    loses its last row/column (H.264 yuv420p needs even sizes)."""
    if shorter_size is None:
        return "crop=trunc(iw/2)*2:trunc(ih/2)*2"
    size = int(shorter_size)
    if size <= 0 or size % 2:
        raise ValueError(f"shorter_size={shorter_size} must be a positive even number (H.264 yuv420p)")
    w_side, h_side = (f"trunc(min({size},iw)/2)*2", f"trunc(min({size},ih)/2)*2") if not upscale else (size, size)
    return f"scale='if(gt(iw,ih),-2,{w_side})':'if(gt(iw,ih),{h_side},-2)'"


def ffmpeg_cut_command(ffmpeg: str, src: str, dst: str, start_seconds: float, seconds: float,
                       target_fps: Optional[float], shorter_size: Optional[int], upscale: bool = True,
                       crf: int = 23) -> list[str]:
    cmd = [ffmpeg, "-nostdin", "-y", "-v", "error", "-ss", repr(float(start_seconds)), "-i", str(src),
           "-t", repr(float(seconds))]
    if target_fps is not None:
        cmd += ["-r", f"{target_fps}"]
    cmd += ["-vf", scale_filter(shorter_size, upscale), "-map", "0:v:0", "-an", "-c:v", "libx264",
            "-pix_fmt", "yuv420p", "-crf", str(int(crf)), str(dst)]
    return cmd


def clip_name(video: str, idx: int) -> str:
    """`{name}_scene-{idx}.mp4` in the video's own relative folder (flat for absolute paths)."""
    p = Path(video)
    name = f"{p.stem}_scene-{idx}.mp4"
    return name if p.is_absolute() or str(p.parent) in ("", ".") else str(p.parent / name)


def cut_scenes(src: str, video: str, scenes: Sequence[Scene], fps: float, save_dir: str,
               min_seconds: Optional[float] = None, max_seconds: Optional[float] = None,
               target_fps: Optional[float] = 30, shorter_size: Optional[int] = 720, upscale: bool = True,
               crf: int = 23) -> list[dict]:
    """Cut the planned scenes of file `src` (`video`: its path as the CSV names it) into save_dir;
    [{"clip": path under save_dir, "scene_index", "scene_start", "scene_end" (s in the source)}]."""
    import imageio_ffmpeg

    from opensora.utils.tensor_files import atomic_write

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    out = []
    for idx, start, n in plan_cuts(scenes, fps, min_seconds, max_seconds):
        name = clip_name(video, idx)
        dst = Path(save_dir) / name

        def cut(tmp: Path) -> None:
            cmd = ffmpeg_cut_command(ffmpeg, src, str(tmp), start / fps, n / fps, target_fps, shorter_size, upscale,
                                     crf)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
                raise RuntimeError(f"ffmpeg failed on scene {idx} ({' '.join(proc.stdout.split())[:300]})")

        atomic_write(dst, cut)
        out.append({"clip": name, "scene_index": idx, "scene_start": round(start / fps, 6),
                    "scene_end": round((start + n) / fps, 6)})
    return out



def cut_row(item: dict, save_dir: str, min_seconds: Optional[float] = None, max_seconds: Optional[float] = None,
            target_fps: Optional[float] = 30, shorter_size: Optional[int] = 720, upscale: bool = True,
            crf: int = 23) -> list[dict]:
    """Cut one CSV row's video ({"file", "path", "timestamp", "fps" (None: read from the file)}) and measure
    the clips: [{"clip", "scene_index", "scene_start", "scene_end", num_frames, height, width, aspect_ratio, fps}]."""
    from opensora.data.media_info import probe

    scenes = parse_timestamp(item["timestamp"])
    fps = item.get("fps")
    if fps is None or not fps > 0:
        info = probe(item["file"], check_decode=False)
        if not info["readable"]:
            raise ValueError(f"unreadable ({info['error']})")
        fps = info["fps"]
    clips = cut_scenes(item["file"], item["path"], scenes, float(fps), save_dir, min_seconds, max_seconds, target_fps,
                       shorter_size, upscale, crf)
    for clip in clips:
        info = probe(str(Path(save_dir) / clip["clip"]), check_decode=True)
        if not info["readable"]:
            raise ValueError(f"clip {clip['clip']} is unreadable ({info['error']})")
        clip.update({k: info[k] for k in ("num_frames", "height", "width", "aspect_ratio", "fps")})
    return clips
