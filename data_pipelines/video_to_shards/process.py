"""One source end to end: decode -> scenes and clips -> filters -> keypoints -> crops -> encoded samples.

``process_source`` never raises for bad input: whatever goes wrong becomes a one-line rejection reason in the
source's journal, and the run goes on with the other sources. Its samples go to a per-source part file
(``_sources/<sid>.tar``) and its journal (``_sources/<sid>.json``, the done marker) is written last, both
atomically, so an interrupted run loses at most the sources in flight.
"""

from __future__ import annotations

import io
import json
import logging
import time
import traceback
from pathlib import Path

import numpy as np

from halfbody.data.media import AUDIO_SAMPLE_RATE, encode_video, encode_wav
from halfbody.data.transforms import Geometry

from . import writer
from .config import PipelineConfig
from .crops import crop_keypoints, halfbody_box, head_box_in_crop, headshot_box
from .decode import SourceError, VideoReader, decode_audio
from .filters import audio_reason, keypoint_reason
from .keypoints import KeypointExtractor
from .scenes import ClipCutter, CutDetector, Segment
from .sources import Source

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


class _SourceRun:
    def __init__(self, source: Source, cfg: PipelineConfig, extractor: KeypointExtractor, part: writer.PartWriter):
        self.source, self.cfg, self.extractor, self.part = source, cfg, extractor, part
        self.clips: list[dict] = []
        self.rejections: list[dict] = []
        self.seconds = 0.0
        self._segments = 0

    # -------------------------------------------------------------------------------- decoding
    def run(self) -> None:
        src, cfg = self.source, self.cfg
        if src.error:  # found while listing (bad list line, video not found)
            category, _, detail = src.error.partition(": ")
            raise SourceError(category, detail)
        reader = VideoReader(src.video, cfg.video.fps, cfg.video.max_side, src.start, src.end,
                             need_src_index=self.extractor.needs_src_index, thumb_width=cfg.scenes.thumb_width)
        self.info = reader.info
        self.extractor.open(src, reader.info)  # a missing sidecar fails before any decoding
        try:
            self.audio = decode_audio(src.audio or src.video, src.start or 0.0, src.end,
                                      origin=0.0 if src.audio else reader.info.origin)
        except SourceError as e:
            if e.category == "no audio" and not src.audio:
                exts = ",".join(cfg.input.audio_extensions)
                raise SourceError("no audio", f"the video has no audio track and there is no separate audio file "
                                  f"({Path(src.video).stem}.{{{exts}}} next to it or in input.audio_dir)") from e
            raise
        detector = CutDetector(cfg.scenes.cut_threshold, cfg.scenes.thumb_width)
        cutter = ClipCutter(cfg.video.fps, cfg.scenes.min_clip_seconds, cfg.scenes.max_clip_seconds,
                            cfg.filters.min_scene_seconds)
        try:
            for frame in reader:
                cut = detector.is_cut(frame.image, frame.thumb)
                for seg in cutter.push(frame, cut):
                    self._segment(seg)
        except SourceError as e:
            if e.category != "undecodable video" or reader.frames_emitted == 0:
                raise
            # A video that breaks off (truncated download): keep what decoded, report the rest.
            self.rejections.append({"where": "source", "reason": str(e)})
        for seg in cutter.flush():
            self._segment(seg)
        self.seconds = reader.frames_emitted / cfg.video.fps
        if reader.truncated is not None:  # e.g. a download that broke off: what decoded is used
            got, declared = reader.truncated
            self.rejections.append({"where": f"{got:.2f}-{declared:.2f} s", "reason": f"truncated video: frames end at "
                                    f"{got:.2f} s of the {declared:.2f} s the container declares"})

    # -------------------------------------------------------------------------------- one clip
    def _segment(self, seg: Segment) -> None:
        n = self._segments
        self._segments += 1
        where = seg.where(self.source.start or 0.0)
        reason = seg.rejection
        if reason is None:
            try:
                reason = self._clip(seg, n, where)
            except SourceError as e:
                if e.category in ("bad sidecar",):
                    raise  # the whole source's keypoints are unusable
                reason = str(e)
        if reason is not None:
            self.rejections.append({"where": where, "reason": reason})
        seg.frames = []  # free the frames

    def _clip(self, seg: Segment, n: int, where: str) -> str | None:
        cfg, src, fps = self.cfg, self.source, self.cfg.video.fps
        T = seg.num_frames
        a0 = int(round(seg.start * AUDIO_SAMPLE_RATE))
        na = int(round(T / fps * AUDIO_SAMPLE_RATE))
        audio = self.audio[a0 : a0 + na]
        missing = na - audio.shape[0]
        if missing > AUDIO_SAMPLE_RATE / fps + 1:
            return (f"audio too short: the audio covers {audio.shape[0] / AUDIO_SAMPLE_RATE:.2f} s of the clip's "
                    f"{T / fps:.2f} s")
        if missing > 0:
            audio = np.pad(audio, (0, missing))
        reason = audio_reason(audio, cfg.filters)
        if reason:
            return reason
        kpts, persons = self.extractor.extract(seg.frames)
        reason = keypoint_reason(kpts, persons, cfg.filters)
        if reason:
            return reason
        frames = np.stack([f.image for f in seg.frames])
        h, w = frames.shape[1:3]
        wav = encode_wav(audio, AUDIO_SAMPLE_RATE)
        key = f"{src.sid}_{n:04d}"
        t0 = (src.start or 0.0) + seg.start
        crops = [("halfbody", key, cfg.crop.size, halfbody_box(kpts, w, h, cfg.crop))]
        if cfg.crop.headshot:
            crops.append(("headshot", f"{key}_head", cfg.crop.headshot_size, headshot_box(kpts, w, h, cfg.crop)))
        for kind, k, size, box in crops:
            geom = Geometry(w, h, size, size, box)
            video = geom.apply_frames_uint8(frames, cfg.crop.pad_value)
            meta = {
                "fps": float(fps), "num_frames": int(T), "width": int(size), "height": int(size), "kind": kind,
                "identity": src.identity, "source": f"{src.label}@{t0:.3f}-{t0 + T / fps:.3f}",
                "crop": {"box": [round(box[0] / w, 5), round(box[1] / h, 5), round(box[2] / w, 5), round(box[3] / h, 5)],
                         "source_size": [self.info.width, self.info.height]},
                "pipeline": {"tool": "data_pipelines.video_to_shards", "version": PIPELINE_VERSION,
                             "keypoints": self.extractor.name, "config": cfg.fingerprint()},
            }
            head = head_box_in_crop(kpts, geom, cfg.crop.score_threshold)
            if head is not None:
                meta["head_box"] = head
            self.part.add({
                "__key__": k,
                "mp4": encode_video(video, fps),
                "wav": wav,
                "kpts.npy": _npy(crop_keypoints(kpts, geom)),
                "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
            })
            self.clips.append({"key": k, "kind": kind, "identity": src.identity, "num_frames": int(T),
                               "seconds": round(T / fps, 4), "where": where})
        return None


def process_source(source: Source, cfg: PipelineConfig, out_dir: str | Path, extractor: KeypointExtractor) -> dict:
    """Process one source: its samples go to its part file, then its journal (the done marker) is written.
    Returns the journal: ``clips`` (key, kind, identity, num_frames, seconds, where) and ``rejections``
    (where, reason) among others."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    part = writer.PartWriter(out, source.sid)
    run = _SourceRun(source, cfg, extractor, part)
    try:
        run.run()
    except SourceError as e:
        part.discard()
        run.clips = []
        run.rejections.append({"where": "source", "reason": str(e)})
    except Exception as e:  # an unexpected library error or a bug: this source is rejected, the run goes on
        log.error("source %s failed:\n%s", source.label, traceback.format_exc())
        part.discard()
        run.clips = []
        msg = str(e).strip().splitlines()
        run.rejections.append({"where": "source", "reason": f"internal error: {type(e).__name__}: {msg[0] if msg else ''}"})
    except BaseException:  # Ctrl-C: nothing of this source is kept
        part.discard()
        raise
    finally:
        notes = list(getattr(extractor, "notes", []) or [])  # e.g. a pixel-unit sidecar converted
        extractor.close()
    part.commit()
    journal = {
        "sid": source.sid, "label": source.label, "video": source.video, "identity": source.identity,
        "start": source.start, "end": source.end, "config": cfg.fingerprint(), "version": PIPELINE_VERSION,
        "clips": run.clips, "rejections": run.rejections, "notes": notes if run.clips else [],
        "seconds_decoded": round(run.seconds, 3),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    writer.write_journal(out, source.sid, journal)
    return journal
