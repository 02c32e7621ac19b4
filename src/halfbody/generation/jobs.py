"""Generation jobs: one video (single mode) or one per row of a list file (batch mode), and the run over them.

Batch rows are checked before the model is built (it is built at the first good row, not at all when none is); a
bad row is one line and the rest go on; finished outputs are skipped on a re-run; each row's mp4 is encoded in the
background while the next row samples (:class:`~halfbody.generation.writer.VideoWriter`).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from halfbody.data import media
from halfbody.generation.conditions import Conditions, prepare
from halfbody.generation.inputs import existing_file
from halfbody.generation.model import Settings, build_model, plan_model, use_bf16
from halfbody.utils.devices import device_from
from halfbody.generation.sampling import sample
from halfbody.generation.writer import VideoWriter
from halfbody.utils.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["Job", "jobs_from", "read_list", "run_job", "generate"]


@dataclass
class Job:
    """One video to make: the inputs of a single run or of one row of a list file."""

    ref: str
    audio: str
    output: Path
    pose: str | None = None
    ref_keypoints: str | None = None
    gt_video: str | None = None
    where: str = ""  # "row 3 of list.txt" in batch mode

    def key(self, name: str) -> str:
        return f"{self.where}: {name}" if self.where else name


def read_list(list_path: str, out_dir: Path) -> tuple[list[Job | str], Path]:
    """The rows of a list file: ``image audio [pose|-] [ground-truth video|-]`` per line, ``#`` comments, paths
    relative to the list file. A row that cannot be parsed becomes its error line."""
    p = existing_file(list_path, "list")
    base = p.parent
    rows: list[Job | str] = []
    names: dict[str, int] = {}
    for n, line in enumerate(p.read_text(errors="replace").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"row {n} of {p.name}"
        try:
            cols = shlex.split(text.replace("\t", " "))
        except ValueError as e:
            rows.append(f"{where}: cannot be parsed ({e})")
            continue
        if not 2 <= len(cols) <= 4:
            rows.append(f"{where}: expected 2-4 columns (image audio [pose|-] [ground-truth video|-]), got {len(cols)}")
            continue
        cols += ["-"] * (4 - len(cols))
        ref, audio, pose, gt = (None if c == "-" else c if c == "auto" and i == 2 else str(base / os.path.expanduser(c))
                                for i, c in enumerate(cols))
        stem = Path(gt).stem if gt else f"{Path(ref).stem}__{Path(audio).stem}"
        if stem in names:
            rows.append(f"{where}: its output {stem}.mp4 is also row {names[stem]}'s (name outputs apart by their "
                        "ground-truth video or image / audio names)")
            continue
        names[stem] = n
        rows.append(Job(ref=ref, audio=audio, pose=pose, gt_video=gt, output=out_dir / f"{stem}.mp4", where=where))
    return rows, p


def jobs_from(cfg: DictConfig) -> tuple[list[Job | str], Path | None, bool]:
    """``(jobs or error lines, output_dir, batch?)``."""
    if cfg.get("list"):
        out_dir = Path(os.path.expanduser(str(cfg.get("output_dir") or cfg.paths.output_dir)))
        rows, _ = read_list(str(cfg.list), out_dir)
        return rows, out_dir, True
    for key in ("ref", "audio"):
        if not cfg.get(key):
            raise UserError(f"{key} is not set: give ref=<image> audio=<audio file> (or list=<file> for batch mode)")
    out = cfg.get("output")
    if not out:
        out = Path(str(cfg.paths.output_dir)) / f"{Path(str(cfg.ref)).stem}__{Path(str(cfg.audio)).stem}.mp4"
    out = Path(os.path.expanduser(str(out)))
    if out.suffix.lower() != ".mp4":
        raise UserError(f"output={str(out)!r}: expected an .mp4 path")
    return [Job(ref=str(cfg.ref), audio=str(cfg.audio), pose=cfg.get("pose"), ref_keypoints=cfg.get("ref_keypoints"),
                output=out)], None, False


def run_job(model, job: Job, s: Settings, device, cfg: DictConfig, desc: str = "",
            conditions: Conditions | None = None, writer: VideoWriter | None = None,
            done=None) -> dict:
    """Sample one job and write its mp4 (in ``writer``'s background thread when given: ``done(error)`` reports it)."""
    c = conditions if conditions is not None else prepare(job, s)
    for note in c.notes:
        log.warning(note)
    frames = sample(model, c, s, device, use_bf16(cfg, device), progress=bool(cfg.get("progress", True)), desc=desc)
    if c.auto_pose is not None:  # pose=auto: the sampled keypoints beside the mp4, to edit and re-use as pose=
        import numpy as np

        from halfbody.utils.io import atomic_output

        with atomic_output(job.output.with_suffix(".pose.npy")) as tmp, open(tmp, "wb") as fh:
            np.save(fh, c.auto_pose.astype(np.float32))
    if writer is None:
        media.write_video(job.output, frames, s.fps, c.audio_out, c.audio_rate)
    else:
        writer.submit(job.output, frames, s.fps, c.audio_out, c.audio_rate, done or (lambda e: None))
    return {"frames": int(frames.shape[0]), "seconds": c.audio16.size / media.AUDIO_SAMPLE_RATE}


def generate(cfg: DictConfig) -> dict[str, Any]:  # noqa: C901 - the run over the jobs, in one place
    """Make the video(s) ``cfg`` asks for. Returns ``{"generated": [...], "skipped": [...], "failed": [...]}``
    (output paths; ``failed`` holds the one-line reasons). Raises ``UserError`` for a bad model / single input."""
    jobs, out_dir, batch = jobs_from(cfg)
    overwrite = bool(cfg.get("overwrite", False))
    summary: dict[str, Any] = {"generated": [], "skipped": [], "failed": []}
    pending = []
    for job in jobs:
        if isinstance(job, str):
            summary["failed"].append(job)
            log.error(job)
            print(f"error: {job}", file=sys.stderr, flush=True)
        elif job.output.exists() and not overwrite:
            summary["skipped"].append(str(job.output))
            log.info("%s exists: skipped (overwrite=true redoes it)", job.output)
        else:
            pending.append(job)
    if pending:
        device = device_from(cfg)
        use_bf16(cfg, device)  # a bad precision value fails here, before any work
        plan = plan_model(cfg)
        s = plan.settings
        if not batch:  # single mode: a bad input fails in seconds, before the model is built
            job = pending[0]
            c = prepare(job, s)
            model = build_model(plan).to(device)
            info = run_job(model, job, s, device, cfg, conditions=c)
            summary["generated"].append(str(job.output))
            log.info("wrote %s (%d frames, %.2f s at %g fps)", job.output, info["frames"], info["seconds"], s.fps)
        else:
            def failed(job: Job, e: BaseException) -> None:
                line = str(e) if str(e).startswith(job.where) else f"{job.where}: {e}"
                summary["failed"].append(line)
                log.error(line)
                print(f"error: {line}", file=sys.stderr, flush=True)

            def written(job: Job, frames: int):
                def done(e: BaseException | None) -> None:
                    if e is not None:
                        failed(job, e if isinstance(e, (UserError, media.MediaError, OSError)) else
                               UserError(f"writing {job.output}: {type(e).__name__}: {e}"))
                        return
                    summary["generated"].append(str(job.output))
                    log.info("%s: wrote %s (%d frames)", job.where, job.output, frames)
                return done

            model = None  # built at the first row whose inputs are good
            with VideoWriter(background=True) as writer:  # row i is encoded while row i + 1 samples
                for i, job in enumerate(pending, start=1):
                    try:
                        c = prepare(job, s)
                        if model is None:
                            model = build_model(plan).to(device)
                        run_job(model, job, s, device, cfg, desc=f"{i}/{len(pending)} {job.output.name}",
                                conditions=c, writer=writer, done=written(job, c.num_frames))
                    except (UserError, media.MediaError) as e:
                        failed(job, e)
    if batch:
        assert out_dir is not None
        line = (f"generated {len(summary['generated'])}, skipped {len(summary['skipped'])} (already done), "
                f"failed {len(summary['failed'])}")
        print(line, file=sys.stderr, flush=True)
        log.info(line)
        from halfbody.utils.io import atomic_output

        with atomic_output(out_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps({**summary, "rows": [
                {"ref": j.ref, "audio": j.audio, "pose": j.pose, "gt_video": j.gt_video, "output": str(j.output)}
                for j in jobs if isinstance(j, Job)]}, indent=2))
    return summary
