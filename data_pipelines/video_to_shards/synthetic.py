"""Synthetic *source* videos with exact sidecar keypoints: synthetic-world talkers on a wider canvas.

For trying the pipeline without real footage, for its tests and for its benchmark::

    python -m data_pipelines.video_to_shards.synthetic --out videos/ --num-videos 4 --seconds 6
    python -m data_pipelines.video_to_shards videos/ --out shards/ --set crop.size=256

``talker_video`` renders one or more synthetic-world speakers (``data_pipelines.synthetic_world.render_clip``),
places them on a landscape (or portrait) canvas, optionally switches to another shot every few seconds (camera
cuts), and writes an H.264 mp4 (with AAC audio, or none), optionally variable-frame-rate or with a display
rotation, plus the sidecar ``<stem>.npy`` in the layout ``SidecarKeypoints`` reads: ``(T, 133, 3)`` or, with
several people, ``(T, P, 133, 3)``, normalised to the frame as displayed.
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from data_pipelines.synthetic_world import WorldConfig, render_clip
from halfbody.data.media import AUDIO_SAMPLE_RATE


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, audio: np.ndarray | None = None,
              times: np.ndarray | None = None, rotation: int = 0, crf: int = 20) -> Path:
    """H.264 (+ AAC) mp4. ``times`` (seconds per frame) makes a variable-frame-rate file; ``rotation`` (degrees
    counter-clockwise) is stored as a display matrix, the frames being stored rotated the other way."""
    path = Path(path)
    t, h, w, _ = frames.shape
    with av.open(str(path), mode="w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = w + (w % 2), h + (h % 2), "yuv420p"
        vs.options = {"crf": str(crf), "preset": "ultrafast"}
        if times is not None:
            vs.time_base = Fraction(1, 1000)
            vs.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            vs.set_display_rotation(rotation)
        aus = None
        if audio is not None:
            aus = c.add_stream("aac", rate=AUDIO_SAMPLE_RATE)
            aus.layout = "mono"
        for i, frame in enumerate(frames):
            if (h % 2) or (w % 2):
                frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if times is not None:
                vf.pts = int(round(times[i] * 1000))
                vf.time_base = Fraction(1, 1000)
            c.mux(vs.encode(vf))
        c.mux(vs.encode())
        if aus is not None:
            pcm = np.clip(np.asarray(audio, np.float32).reshape(1, -1), -1, 1)
            for s in range(0, pcm.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, s : s + 1024]), format="fltp", layout="mono")
                af.sample_rate, af.pts = AUDIO_SAMPLE_RATE, s
                c.mux(aus.encode(af))
            c.mux(aus.encode())
    return path


def _shot(seed: int, index: int, num_frames: int, fps: float, person: int, canvas: tuple[int, int],
          offsets: list[tuple[int, int]]):
    """Render ``len(offsets)`` people of one shot on a ``canvas = (W, H)``; returns frames, kpts (T, P, 133, 3), audio."""
    w, h = canvas
    frames = None
    kpts, audio = [], None
    for p, (ox, oy) in enumerate(offsets):
        clip = render_clip(WorldConfig(seed=seed, resolution=person, fps=fps, num_frames=num_frames,
                                       num_identities=8), index + 7 * p, kind="halfbody")
        if frames is None:
            frames = np.empty((num_frames, h, w, 3), np.uint8)
            frames[:] = clip.frames[0, 0, 0]  # the speaker's background colour
            audio = clip.audio
        x0, y0 = max(ox, 0), max(oy, 0)
        x1, y1 = min(ox + person, w), min(oy + person, h)
        frames[:, y0:y1, x0:x1] = clip.frames[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        k = clip.kpts.copy()
        k[..., 0] = (ox + k[..., 0] * person) / w
        k[..., 1] = (oy + k[..., 1] * person) / h
        inside = (k[..., 0] >= 0) & (k[..., 0] <= 1) & (k[..., 1] >= 0) & (k[..., 1] <= 1)
        k[..., 2] = np.where(inside, k[..., 2], 0.0)
        k[..., :2] = np.clip(k[..., :2], 0, 1)
        kpts.append(k)
    return frames, np.stack(kpts, axis=1), audio


def talker_video(path: str | Path, *, seed: int = 0, index: int = 0, seconds: float = 2.0, fps: float = 25.0,
                 canvas: tuple[int, int] = (320, 180), person: int | None = None, people: int = 1,
                 shot_seconds: float | None = None, audio: str | None = "voice", vfr: bool = False,
                 rotation: int = 0, dot: tuple[int, float, float] | None = None, dot_radius: int = 2,
                 sidecar: bool = True) -> dict:
    """Write a synthetic talking-person mp4 (+ sidecar). Returns ``{"frames", "kpts", "audio", "times"}`` as written
    (frames as displayed, before the stored rotation; ``kpts (T, P, 133, 3)``).

    Args:
        canvas: displayed ``(width, height)``; ``person`` the speaker's square size (default: the canvas height).
        people: speakers side by side (a sidecar with P slots).
        shot_seconds: switch to another speaker/shot every this many seconds (camera cuts).
        audio: ``voice`` (the talker's voice), ``silent`` (an all-zero track) or None (no audio track).
        vfr: variable frame rate (alternating 1 and 2 frame intervals, ``seconds`` of video).
        rotation: store the frames rotated and tag a display rotation (degrees counter-clockwise).
        dot: ``(keypoint index, x, y)``: move the first speaker's keypoint there (normalised to the speaker's
            square, score 1) and draw a pure green dot on it in every frame (the keypoint is snapped to the dot's
            pixel centre).
    """
    w, h = canvas
    person = int(person or min(h, w))
    n = int(round(seconds * fps))
    shot = int(round((shot_seconds or seconds) * fps))
    offsets_1 = [((w - person * people) // 2 + p * person, (h - person) // 2) for p in range(people)]
    parts_f, parts_k, parts_a = [], [], []
    s = 0
    while s < n:
        m = min(shot, n - s)
        f, k, a = _shot(seed, index + s // shot, m, fps, person, canvas, offsets_1)
        parts_f.append(f)
        parts_k.append(k)
        parts_a.append(a)
        s += m
    frames = np.concatenate(parts_f)
    kpts = np.concatenate(parts_k).astype(np.float32)
    voice = np.concatenate(parts_a)
    if dot is not None:
        ki, dx, dy = dot
        ox, oy = offsets_1[0]
        cx, cy = int(np.floor(ox + dx * person)), int(np.floor(oy + dy * person))
        kpts[:, 0, ki] = ((cx + 0.5) / w, (cy + 0.5) / h, 1.0)  # the dot's pixel centre
        frames[:, max(cy - dot_radius, 0) : cy + dot_radius + 1, max(cx - dot_radius, 0) : cx + dot_radius + 1] = (0, 255, 0)
    times = None
    if vfr:
        steps = np.where(np.arange(n) % 2 == 0, 1.0, 2.0) / fps
        times = np.concatenate([[0.0], np.cumsum(steps)[:-1]])
        keep = times < seconds
        frames, kpts, times = frames[keep], kpts[keep], times[keep]
    track = None
    if audio == "voice":
        track = voice
    elif audio == "silent":
        track = np.zeros_like(voice)
    stored = np.ascontiguousarray(np.rot90(frames, k=-(rotation // 90), axes=(1, 2))) if rotation else frames
    write_mp4(path, stored, fps, track, times=times, rotation=rotation)
    out = kpts[:, 0] if people == 1 else kpts
    if sidecar:
        np.save(Path(path).with_suffix(".npy"), out.astype(np.float32))
    return {"frames": frames, "kpts": kpts, "audio": voice, "times": times}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.video_to_shards.synthetic",
                                description="Write synthetic talking-person source videos with sidecar keypoints.")
    p.add_argument("--out", required=True)
    p.add_argument("--num-videos", type=int, default=4)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--shot-seconds", type=float, default=None, help="a camera cut every this many seconds")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(a.num_videos):
        talker_video(out / f"talk{i:03d}.mp4", seed=a.seed, index=10 * i, seconds=a.seconds, fps=a.fps,
                     canvas=(a.width, a.height), shot_seconds=a.shot_seconds)
    print(f"wrote {a.num_videos} videos with sidecar keypoints to {out}")


if __name__ == "__main__":
    main()
