"""What ``python -m halfbody.evaluate`` scores: the pairs of generated / ground-truth videos (two folders matched by
file stem, or a ``python -m halfbody.generate`` batch list and its output folder), the device, and start-up checks of
the pinned protocol (``conf/evaluate.yaml`` ``protocol.*``, docs/EVALUATION.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from halfbody.utils.errors import UserError

__all__ = ["VIDEO_SUFFIXES", "check_protocol", "collect_pairs"]

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


def _dir(value: Any, key: str) -> Path:
    p = Path(os.path.expanduser(str(value)))
    if not p.exists():
        raise UserError(f"{key}={str(value)!r} does not exist")
    if not p.is_dir():
        raise UserError(f"{key}={str(value)!r} is not a directory (expected a folder of videos)")
    return p


def _videos(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES and not f.name.startswith("."):
            out.setdefault(f.stem, f)
    return out


def collect_pairs(cfg: DictConfig):
    """``(pairs, problems, inputs)``: the videos to score, one-line notes on what was left out, and the inputs."""
    from halfbody.metrics.evaluation import VideoPair

    if not cfg.get("generated"):
        raise UserError("generated is not set: give generated=<folder of generated videos> and ground_truth=<folder> "
                        "(matched by file stem), or list=<generate batch list> generated=<its output_dir>")
    gen_dir = _dir(cfg.generated, "generated")
    generated = _videos(gen_dir)
    problems: list[str] = []
    pairs = []
    inputs: dict[str, Any] = {"generated": str(gen_dir)}
    if cfg.get("list"):
        from halfbody.generation.jobs import Job, read_list

        rows, list_path = read_list(str(cfg.list), gen_dir)
        inputs["list"] = str(list_path)
        for job in rows:
            if not isinstance(job, Job):
                problems.append(job)
                continue
            if not job.output.is_file():
                problems.append(f"{job.where}: {job.output.name} is not in generated={str(gen_dir)!r} (not generated)")
                continue
            gt = Path(job.gt_video) if job.gt_video else None
            if gt is not None and not gt.is_file():
                problems.append(f"{job.where}: ground-truth video {str(gt)!r} does not exist (scored without it)")
                gt = None
            pairs.append(VideoPair(name=job.output.stem, generated=job.output, ground_truth=gt,
                                   reference=Path(job.ref) if job.ref else None,
                                   audio=Path(job.audio) if job.audio else None,
                                   pose=Path(job.pose) if job.pose and job.pose.endswith(".npy") else None))
        if cfg.get("ground_truth"):
            problems.append("ground_truth is ignored with list= (the list's 4th column names each ground truth)")
    else:
        if not cfg.get("ground_truth"):
            raise UserError("ground_truth is not set: give ground_truth=<folder of real videos> (matched to "
                            "generated= by file stem), or list=<generate batch list>")
        gt_dir = _dir(cfg.ground_truth, "ground_truth")
        inputs["ground_truth"] = str(gt_dir)
        real = _videos(gt_dir)
        for stem in sorted(set(generated) | set(real)):
            if stem not in real:
                problems.append(f"{generated[stem].name}: no ground truth {stem}.* in ground_truth={str(gt_dir)!r}")
            elif stem not in generated:
                problems.append(f"{real[stem].name}: no generated {stem}.* in generated={str(gen_dir)!r}")
            else:
                pairs.append(VideoPair(name=stem, generated=generated[stem], ground_truth=real[stem]))
    if not pairs:
        where = f"list={str(cfg.list)!r}" if cfg.get("list") else f"generated={str(cfg.generated)!r}"
        detail = f" ({problems[0]}{' ...' if len(problems) > 1 else ''})" if problems else ""
        raise UserError(f"{where}: no video to evaluate{detail}")
    inputs["videos"] = len(pairs)
    return pairs, problems, inputs


def check_protocol(cfg: DictConfig) -> None:
    """Start-up checks of the protocol values (one line naming the key)."""
    p = cfg.protocol
    for key, minimum in (("resolution", 32), ("fid_resize", 75), ("fvd_resize", 32), ("fvd_clip_frames", 1),
                         ("ssim_kernel", 3), ("sync_vshift", 1)):
        v = p.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise UserError(f"protocol.{key}={v!r}: expected an integer >= {minimum}")
    if p.get("fps") is not None and (isinstance(p.fps, bool) or not isinstance(p.fps, (int, float)) or p.fps <= 0):
        raise UserError(f"protocol.fps={p.fps!r}: expected a frame rate > 0 (or null: as stored)")
    nf = p.get("num_frames")
    if nf is not None and (isinstance(nf, bool) or not isinstance(nf, int) or nf < 1):
        raise UserError(f"protocol.num_frames={nf!r}: expected an integer >= 1 (or null: all frames)")
    if p.get("synthetic", "auto") not in ("auto", True, False):
        raise UserError(f"protocol.synthetic={p.synthetic!r}: expected auto, true or false")
    box = list(p.get("face_fallback_box") or [])
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise UserError(f"protocol.face_fallback_box={box!r}: expected [x0, y0, x1, y1] in [0, 1], x0 < x1, y0 < y1")
