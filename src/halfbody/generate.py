"""Generation entry point: ``python -m halfbody.generate ckpt_path=<run>/checkpoints/last.ckpt ref=me.png audio=talk.mp3``.

It only composes and runs (the lightning-hydra-template ``eval.py`` pattern): sampling lives in each family's
LightningModule / pipeline (``EchoMimicV2Module.generate`` on :class:`~halfbody.echomimic_v2.pipeline.EchoMimicV2Pipeline`,
``MirrorMeModule.generate_long``), the same code validation runs. Settings: ``conf/generate.yaml``.

- **Weights.** ``ckpt_path`` (a Lightning checkpoint from ``train``). Its model config is the run's own
  ``<run>/.hydra/config.yaml`` when the checkpoint sits in ``<run>/checkpoints/`` (``run_config=auto``), else the
  ``model`` group composed here (``family=...``, ``model=...``); a checkpoint of the other family is refused in one
  line. Without ``ckpt_path`` the model config's own weights are used (the pretrained / imported directories, e.g.
  ``model=echomimic_v2 model/network=echomimic_v2_official``).
- **Inputs.** ``ref``: an image (png / jpg / webp, any size), resized and centre-cropped to the model's resolution
  like validation crops a training clip, or cropped to its half-body box from its keypoints
  (``ref_keypoints=<(133, 3) or (1, 133, 3) .npy>``, ``crop=keypoints``, the ``video_to_shards`` crop). ``audio``: any
  file PyAV decodes, any rate and channel count. ``pose``: optional COCO-WholeBody keypoints ``(T, 133, 3)`` in
  ``[0, 1]`` of the reference image's frame, at ``pose_fps`` (default ``fps``); EchoMimicV2 needs one.
- **Output.** An H.264 + AAC mp4 exactly as long as the audio (``round(seconds * fps)`` frames), at ``fps``, written
  to a temporary name and renamed when complete.
- **Batch mode.** ``list=<file>``: one row per video (``image audio [pose|-] [ground-truth video|-]``), one mp4 per
  row in ``output_dir``; finished outputs are skipped on a re-run, a bad row is reported in one line and skipped,
  a summary ends the run (``summary.json`` in ``output_dir``); the exit code is 2 when a row failed.

A bad input ends in one line, ``error: <key>=<value>: <problem>``, and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from halfbody.data import media
from halfbody.utils.errors import UserError, exit_on_user_error
from halfbody.utils.hydra import CONFIG_DIR

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


# ================================================================================================ inputs
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


@dataclass
class Conditions:
    """A job's inputs, decoded and checked: pixels, 16 kHz audio, keypoints in output pixels."""

    ref: torch.Tensor  # (3, H, W) in [-1, 1]
    audio16: np.ndarray  # (S,) 16 kHz mono
    audio_out: np.ndarray  # mono at audio_rate, for the mp4
    audio_rate: int
    num_frames: int
    pose_kpts: np.ndarray | None = None  # (F, 133, 3) output pixels
    ref_kpts: np.ndarray | None = None  # (1, 133, 3) output pixels
    valid: torch.Tensor | None = None  # (1, H, W)
    notes: list[str] = field(default_factory=list)


def _exists(path: str, key: str) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise UserError(f"{key}={str(path)!r} does not exist")
    if p.is_dir():
        raise UserError(f"{key}={str(path)!r} is a directory, expected a file")
    return p


def load_image(path: str, key: str = "ref") -> np.ndarray:
    """An RGB uint8 ``(H, W, 3)`` image; a file that is not an image is a one-line ``UserError``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = _exists(path, key)
    try:
        with Image.open(p) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos: upright as displayed
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            img = np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{key}={str(path)!r} is not an image PIL can read (png, jpg, webp): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from None
    if img.shape[0] < 2 or img.shape[1] < 2:
        raise UserError(f"{key}={str(path)!r}: image is {img.shape[1]}x{img.shape[0]} pixels, too small")
    return img


def load_audio(path: str, key: str, silence_dbfs: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``(16 kHz mono, mono at the file's rate, rate)``; undecodable, empty or silent audio is a ``UserError``."""
    p = _exists(path, key)
    try:
        audio16, samples, rate = media.load_audio_file_16k(p)
    except media.MediaError as e:
        msg = str(e)
        if "no samples" in msg or "is empty" in msg:
            raise UserError(f"{key}={str(path)!r} has no audio samples (zero-length audio)") from None
        raise UserError(f"{key}={str(path)!r}: not decodable audio ({msg})") from None
    if samples.size == 0 or audio16.size == 0:
        raise UserError(f"{key}={str(path)!r} has no audio samples (zero-length audio)")
    if not np.all(np.isfinite(samples)):
        raise UserError(f"{key}={str(path)!r}: audio samples are not finite")
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    dbfs = 20 * math.log10(rms) if rms > 0 else -math.inf
    if dbfs < silence_dbfs:
        raise UserError(f"{key}={str(path)!r} is silent ({dbfs:.0f} dBFS RMS over {samples.size / rate:.2f} s, below "
                        f"silence_dbfs={silence_dbfs:g})")
    return audio16, samples, int(rate)


def load_keypoints(path: str, key: str, width: int, height: int, single: bool = False) -> np.ndarray:
    """``(T, 133, 3)`` (``single``: one frame, ``(133, 3)`` or ``(1, 133, 3)``) keypoints in ``[0, 1]``."""
    from halfbody.data.keypoints import NUM_KEYPOINTS, unnormalised_keypoints

    p = _exists(path, key)
    if p.suffix.lower() in VIDEO_SUFFIXES:
        raise UserError(f"{key}={str(path)!r}: a driving video is not supported yet; give its keypoints as a (T, 133, 3) "
                        ".npy (COCO-WholeBody, x, y in [0, 1], score), e.g. from data_pipelines.video_to_shards")
    try:
        k = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{key}={str(path)!r} is not a .npy array ({type(e).__name__}: {e})") from None
    if single and k.ndim == 2:
        k = k[None]
    want = "(133, 3) or (1, 133, 3)" if single else "(T, 133, 3)"
    if k.ndim != 3 or k.shape[1:] != (NUM_KEYPOINTS, 3) or k.shape[0] < 1 or (single and k.shape[0] != 1):
        raise UserError(f"{key}={str(path)!r} has shape {tuple(k.shape)}, expected {want} COCO-WholeBody keypoints")
    if not (np.issubdtype(k.dtype, np.floating) or np.issubdtype(k.dtype, np.integer)):
        raise UserError(f"{key}={str(path)!r} has dtype {k.dtype}, expected float keypoints")
    k = k.astype(np.float32)
    if not np.all(np.isfinite(k)):
        raise UserError(f"{key}={str(path)!r} holds {int((~np.isfinite(k)).sum())} non-finite values")
    units = unnormalised_keypoints(k, width, height)
    if units is not None:
        raise UserError(f"{key}={str(path)!r}: {units}")
    return k


# ================================================================================================ settings
@dataclass
class Settings:
    """What ``conf/generate.yaml`` and the model's (run) config say about one generation run."""

    family: str
    fps: float
    height: int
    width: int
    pose_groups: Any
    mask_margins: dict
    score_threshold: float
    target_head_box: tuple[float, ...]
    clip_frames: int
    motion_latent_frames: int
    pose_fps: float | None
    pose_policy: str
    crop: str
    silence_dbfs: float
    seed: int
    steps: int | None
    guidance_scale: float | None
    pad_value: int = 0


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def _select(cfg: DictConfig | None, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    value = OmegaConf.select(cfg, key, default=default)
    return _plain(value) if isinstance(value, DictConfig) else (
        OmegaConf.to_container(value, resolve=True) if OmegaConf.is_list(value) else value)


def find_run_config(cfg: DictConfig) -> Path | None:
    """``run_config``: ``auto`` -> ``<run>/.hydra/config.yaml`` of a checkpoint in ``<run>/checkpoints/`` (if any);
    null -> none; a path -> that file."""
    rc = cfg.get("run_config", "auto")
    ckpt = cfg.get("ckpt_path")
    if rc is None or rc == "":
        return None
    if rc == "auto":
        if not ckpt:
            return None
        candidate = Path(os.path.expanduser(str(ckpt))).resolve().parent.parent / ".hydra" / "config.yaml"
        return candidate if candidate.is_file() else None
    return _exists(str(rc), "run_config")


def _sampler_config(name: str) -> DictConfig:
    """``conf/model/sampler/<name>.yaml`` with its defaults merged (a ``# @package model`` fragment)."""
    path = CONFIG_DIR / "model" / "sampler" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "model" / "sampler").glob("*.yaml"))
        raise UserError(f"sampler={name!r}: no such sampler variant (conf/model/sampler/: {', '.join(known)})")
    raw = OmegaConf.load(path)
    merged = OmegaConf.create()
    for d in raw.pop("defaults", []) or []:
        if d != "_self_":
            merged = OmegaConf.merge(merged, _sampler_config(str(d)))
    return OmegaConf.merge(merged, raw)


def model_config(cfg: DictConfig) -> tuple[DictConfig, DictConfig, Path | None]:
    """The model config (with ``generate``'s overrides applied) and the run config it came from (or ``cfg``)."""
    run_path = find_run_config(cfg)
    source: DictConfig = cfg
    if run_path is not None:
        try:
            source = OmegaConf.load(run_path)
        except Exception as e:  # noqa: BLE001 - a broken yaml is the user's file
            raise UserError(f"run_config={str(run_path)!r} is not a readable config ({type(e).__name__}: {e})") from None
        if not isinstance(source, DictConfig) or "model" not in source:
            raise UserError(f"run_config={str(run_path)!r} has no model config (expected a train run's "
                            ".hydra/config.yaml)")
        log.info("model config from the run: %s", run_path)
    # a copy of the whole config (the model's interpolations may name any of its keys), with this machine's paths
    root = OmegaConf.create(OmegaConf.to_container(source, resolve=False))
    with open_dict(root):
        root.pop("hydra", None)
        root.paths = OmegaConf.create(OmegaConf.to_container(cfg.paths, resolve=True))
    model_cfg = root.model
    with open_dict(model_cfg):
        if "init_checkpoint" in model_cfg:
            model_cfg.init_checkpoint = None  # the checkpoint's weights are loaded below
        if "phd_loss" in model_cfg:
            model_cfg.phd_loss = None  # a training loss: its extractors' weights are not needed to sample
        target = str(model_cfg.get("_target_", ""))
        if cfg.get("sampler"):
            if not target.endswith("EchoMimicV2Module"):
                raise UserError(f"sampler={cfg.sampler!r}: only EchoMimicV2 has sampler variants (MirrorMe samples "
                                "with Euler steps; set steps / guidance_scale)")
            for k, v in _sampler_config(str(cfg.sampler)).items():
                model_cfg[k] = v
        if cfg.get("steps") is not None:
            if not (isinstance(cfg.steps, int) and cfg.steps >= 1):
                raise UserError(f"steps={cfg.steps!r}: expected an integer >= 1")
            model_cfg.num_inference_steps = int(cfg.steps)
        if cfg.get("guidance_scale") is not None:
            g = cfg.guidance_scale
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 0:
                raise UserError(f"guidance_scale={g!r}: expected a number >= 0 (1: no classifier-free guidance)")
            model_cfg.guidance_scale = float(g)
    return model_cfg, root, run_path


def checkpoint_phase(source: DictConfig, ckpt: dict | None) -> tuple[int, dict] | None:
    """The curriculum phase the checkpoint was taken in (its ``CurriculumCallback`` state, matched by name), else the
    run's last phase; None when the run has no curriculum."""
    phases = _select(source, "callbacks.curriculum.phases", None)
    if not isinstance(phases, list) or not phases:
        return None
    names = [ph.get("name") if isinstance(ph, dict) else None for ph in phases]
    for state in ((ckpt or {}).get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("phase_name") in names:
            i = names.index(state["phase_name"])
            return i, phases[i]
    return len(phases) - 1, phases[-1]


def settings_from(cfg: DictConfig, source: DictConfig, family: str, phase: dict | None = None) -> Settings:
    from halfbody.data.conditions import DEFAULT_MASK_MARGINS
    from halfbody.data.transforms import parse_resolution

    data = source.get("data")
    fps = cfg.get("fps") if cfg.get("fps") is not None else _select(data, "fps", 25.0)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise UserError(f"fps={fps!r}: expected a frame rate > 0")
    res = cfg.get("resolution") if cfg.get("resolution") is not None else _select(data, "resolution", 512)
    try:
        h, w = parse_resolution(_plain(res) if not OmegaConf.is_list(res) else list(res))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    pose_groups = cfg.get("pose_groups")
    if pose_groups is None and phase is not None:  # the checkpoint's curriculum phase, else the data config
        pose_groups = phase.get("pose_groups")
    if pose_groups is None:
        pose_groups = _select(data, "condition.pose_groups", "full")
    margins = {**DEFAULT_MASK_MARGINS, **(_select(data, "condition.mask_margins", None) or {}),
               **(((phase or {}).get("data") or {}).get("mask_margins") or {})}
    clip_frames = cfg.get("clip_frames") or _select(data, "num_frames", 9)
    pose_fps = cfg.get("pose_fps")
    if pose_fps is not None and (isinstance(pose_fps, bool) or not isinstance(pose_fps, (int, float)) or not pose_fps > 0):
        raise UserError(f"pose_fps={pose_fps!r}: expected the pose sequence's frame rate (> 0), or null for fps")
    policy = str(cfg.get("pose_policy", "refuse"))
    if policy not in ("refuse", "hold"):
        raise UserError(f"pose_policy={policy!r}: expected refuse (a pose shorter than the audio is an error) or hold "
                        "(the last pose is held to the end)")
    crop = str(cfg.get("crop", "auto"))
    if crop not in ("auto", "center", "keypoints"):
        raise UserError(f"crop={crop!r}: expected auto, center or keypoints")
    thb = _select(data, "target_head_box", None)
    if thb is None:
        from halfbody.data.dataset import DEFAULT_TARGET_HEAD_BOX
        thb = DEFAULT_TARGET_HEAD_BOX
    return Settings(
        family=family, fps=float(fps), height=h, width=w, pose_groups=_plain(pose_groups), mask_margins=margins,
        score_threshold=float(_select(data, "score_threshold", 0.3) or 0.3), target_head_box=tuple(thb),
        clip_frames=int(clip_frames), motion_latent_frames=int(cfg.get("motion_latent_frames") or 1),
        pose_fps=pose_fps, pose_policy=policy, crop=crop,
        silence_dbfs=float(cfg.get("silence_dbfs", -60.0)), seed=int(cfg.get("seed") or 0),
        steps=cfg.get("steps"), guidance_scale=cfg.get("guidance_scale"))


# ================================================================================================ model
def _device(cfg: DictConfig) -> torch.device:
    name = str(cfg.get("device", "auto"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"device={name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r}: no CUDA device is available (use device=cpu or device=auto)")
    return dev


def _bf16(cfg: DictConfig, device: torch.device) -> bool:
    precision = str(cfg.get("precision", "auto"))
    if precision not in ("auto", "32", "32-true", "bf16", "bf16-mixed"):
        raise UserError(f"precision={precision!r}: expected auto (bf16-mixed on GPU, 32 on CPU), 32 or bf16-mixed")
    return precision.startswith("bf16") or (precision == "auto" and device.type == "cuda")


@contextlib.contextmanager
def _autocast(model: torch.nn.Module, device: torch.device, bf16: bool) -> Iterator[None]:
    """bf16 autocast for the denoiser and the autoencoder; the frozen audio encoder stays in fp32 (its mel front end
    has no bf16 path, and its features are computed once per video)."""
    if not bf16:
        yield
        return
    encoder = model.audio_encoder
    forward = encoder.forward

    def fp32_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device.type, enabled=False):
            return forward(*args, **kwargs)

    encoder.forward = fp32_forward
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    finally:
        del encoder.forward  # back to the class's forward


@dataclass
class ModelPlan:
    """What :func:`plan_model` found: the model config to build, the checkpoint to load into it, the settings."""

    model_cfg: DictConfig
    settings: Settings
    ckpt_path: str | None
    ckpt: dict | None
    phase: tuple[int, dict] | None = None  # (index, phase config) the checkpoint was trained in
    audio_region: str | None = None  # generate's override


def plan_model(cfg: DictConfig) -> ModelPlan:
    """Check the checkpoint (readable, of the config's family) and resolve the settings, without building anything."""
    from halfbody.models.families import FAMILY_TARGETS, family_class
    from halfbody.utils.checkpoint_io import check_checkpoint_family, inspect_checkpoint

    ckpt_path = cfg.get("ckpt_path")
    ckpt = inspect_checkpoint(ckpt_path, "ckpt_path") if ckpt_path else None
    model_cfg, source, _ = model_config(cfg)
    target = str(model_cfg.get("_target_", ""))
    cls = family_class(target)
    if cls is None:
        raise UserError(f"model._target_={target!r}: not a halfbody model family ({', '.join(FAMILY_TARGETS)})")
    family = cls.FAMILY
    if ckpt is not None:
        check_checkpoint_family(ckpt, ckpt_path, "ckpt_path", target)
    phase = checkpoint_phase(source, ckpt)
    settings = settings_from(cfg, source, family, phase[1] if phase else None)
    check_geometry(settings, model_cfg)
    return ModelPlan(model_cfg, settings, ckpt_path, ckpt, phase, cfg.get("audio_region") or None)


def check_geometry(s: Settings, model_cfg: DictConfig) -> None:
    """The resolution (and MirrorMe's clip length) the autoencoder can take, asked of its config (no weights)."""
    from halfbody.utils.startup_checks import autoencoder_factors

    factors = autoencoder_factors(_plain(model_cfg.get("autoencoder")))
    if factors is None:
        return
    spatial, temporal = factors
    if s.height % spatial or s.width % spatial:
        raise UserError(f"resolution=[{s.height}, {s.width}]: the model's autoencoder needs sides divisible by {spatial}")
    if s.family == "mirrorme":
        if s.clip_frames < 1 + temporal or (s.clip_frames - 1) % temporal:
            raise UserError(f"clip_frames={s.clip_frames}: MirrorMe's causal autoencoder needs 1 + k*{temporal} frames "
                            f"per clip, k >= 1 (e.g. {1 + temporal}, {1 + 2 * temporal})")
        latent = 1 + (s.clip_frames - 1) // temporal
        if not 1 <= s.motion_latent_frames < latent:
            raise UserError(f"motion_latent_frames={s.motion_latent_frames}: expected 1 to {latent - 1} for "
                            f"{s.clip_frames}-frame clips")


def build_model(plan: ModelPlan) -> torch.nn.Module:
    """The LightningModule with the checkpoint's weights (strict), or its config's own weights."""
    target = plan.model_cfg.get("_target_")
    log.info("model <%s>", target)
    model = hydra.utils.instantiate(plan.model_cfg)
    if plan.ckpt is not None:
        try:
            result = model.load_state_dict(plan.ckpt["state_dict"], strict=False)
        except RuntimeError as e:  # tensors of other shapes
            detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise UserError(f"ckpt_path={str(plan.ckpt_path)!r}: its weights do not fit the model config ({target}): "
                            f"{detail}; give the run's config with run_config=<run>/.hydra/config.yaml or the preset "
                            "it was trained with (model=...)") from None
        if result.missing_keys or result.unexpected_keys:
            parts = []
            for name, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
                if keys:
                    parts.append(f"{len(keys)} {name} (e.g. {', '.join(keys[:3])})")
            raise UserError(f"ckpt_path={str(plan.ckpt_path)!r}: its weights do not fit the model config ({target}): "
                            f"{'; '.join(parts)}; give the run's config with run_config=<run>/.hydra/config.yaml or "
                            "the preset it was trained with (model=...)")
        plan.ckpt = None
    else:
        log.warning("no ckpt_path: generating with the model config's own weights (%s)", target)
    if plan.phase is not None:  # the phase's muted groups and audio region, as in training
        from halfbody.phases.spec import PhaseSpec

        index, phase = plan.phase
        try:
            spec = PhaseSpec.from_config({k: v for k, v in phase.items() if k != "losses"}, index)  # no loss here
            model.apply_phase(spec)
        except ValueError as e:
            raise UserError(f"run_config: phase {phase.get('name')!r} does not apply to the model: {e}") from None
        log.info("phase %r of the run: audio_region=%s, muted=%s, pose groups %s", spec.name, model.audio_region,
                 sorted(model.muted_groups), plan.settings.pose_groups)
    if plan.audio_region:
        try:
            model.audio_region = plan.audio_region
        except ValueError as e:
            raise UserError(f"audio_region={plan.audio_region!r}: {e}") from None
    model.eval().requires_grad_(False)
    return model


# ================================================================================================ conditions
def _geometry(img: np.ndarray, ref_kpts: np.ndarray | None, s: Settings, job: Job):
    from halfbody.data.transforms import Geometry, crop_geometry

    src_h, src_w = img.shape[:2]
    mode = s.crop if s.crop != "auto" else ("keypoints" if ref_kpts is not None else "center")
    if mode == "center":
        return crop_geometry(src_w, src_h, s.width, s.height, None)
    if ref_kpts is None:
        raise UserError(f"{job.key('crop')}=keypoints needs ref_keypoints (the image's (133, 3) keypoints .npy)")
    from data_pipelines.video_to_shards.config import CropConfig
    from data_pipelines.video_to_shards.crops import halfbody_box
    from data_pipelines.video_to_shards.decode import SourceError

    try:
        x0, y0, x1, y1 = halfbody_box(ref_kpts, src_w, src_h, CropConfig(score_threshold=s.score_threshold))
    except SourceError as e:
        raise UserError(f"{job.key('ref_keypoints')}={job.ref_keypoints!r}: no half-body crop ({e})") from None
    bw, bh = x1 - x0, y1 - y0
    aspect = s.width / s.height
    if bw / bh < aspect:  # grow the square box to the output's aspect about its centre
        grow = int(round(bh * aspect)) - bw
        x0, x1 = x0 - grow // 2, x1 + grow - grow // 2
    elif bw / bh > aspect:
        grow = int(round(bw / aspect)) - bh
        y0, y1 = y0, y1 + grow  # keep the head at the top
    return Geometry(src_w, src_h, s.width, s.height, (x0, y0, x1, y1))


def prepare(job: Job, s: Settings) -> Conditions:
    """Decode and check a job's inputs (before any sampling)."""
    from halfbody.data.conditions import valid_mask
    from halfbody.data.transforms import frame_indices

    img = load_image(job.ref, job.key("ref"))
    audio16, samples, rate = load_audio(job.audio, job.key("audio"), s.silence_dbfs)
    seconds = samples.size / rate
    num_frames = int(round(seconds * s.fps))
    if num_frames < 1:
        raise UserError(f"{job.key('audio')}={job.audio!r} is {seconds * 1000:.1f} ms long, shorter than half a frame "
                        f"at fps={s.fps:g}")
    src_h, src_w = img.shape[:2]
    ref_kpts = None
    if job.ref_keypoints:
        ref_kpts = load_keypoints(job.ref_keypoints, job.key("ref_keypoints"), src_w, src_h, single=True)
    pose = None
    if job.pose:
        pose = load_keypoints(job.pose, job.key("pose"), src_w, src_h)
    elif s.family == "echomimic_v2":
        raise UserError(f"{job.key('pose')} is not set: EchoMimicV2 animates a pose sequence; give pose=<(T, 133, 3) "
                        "keypoints .npy> (audio-only generation needs the audio-to-pose model, issue 14, not built yet)")
    geom = _geometry(img, ref_kpts, s, job)
    ref = geom.apply_frames(img[None], s.pad_value)[0]
    notes: list[str] = []
    pose_px = None
    if pose is not None:
        pose_fps = float(s.pose_fps or s.fps)
        have = pose.shape[0] / pose_fps
        idx = frame_indices(0, num_frames, pose_fps, s.fps)
        short = int(idx[-1]) - (pose.shape[0] - 1)
        if short > 0:
            missing_s = seconds - have
            if s.pose_policy == "refuse" and short > 1:
                raise UserError(f"{job.key('pose')}={job.pose!r} has {pose.shape[0]} frames at {pose_fps:g} fps "
                                f"({have:.2f} s), shorter than the audio {job.audio!r} ({seconds:.2f} s, "
                                f"{num_frames} frames): give a pose as long as the audio, or pose_policy=hold to hold "
                                "its last pose")
            notes.append(f"pose {job.pose}: {missing_s:.2f} s shorter than the audio, last pose held")
        pose_px = geom.apply_keypoints(pose[np.clip(idx, 0, pose.shape[0] - 1)])
    audio_rate = rate if rate in AAC_RATES else media.AUDIO_SAMPLE_RATE
    audio_out = samples if audio_rate == rate else audio16
    return Conditions(ref=ref, audio16=audio16, audio_out=audio_out, audio_rate=audio_rate, num_frames=num_frames,
                      pose_kpts=pose_px,
                      ref_kpts=None if ref_kpts is None else geom.apply_keypoints(ref_kpts),
                      valid=valid_mask(s.height, s.width, geom.valid_rect() if geom.is_padded else None), notes=notes)


def _face_masks(c: Conditions, s: Settings) -> dict[str, torch.Tensor]:
    """Region masks ``(F or 1, 1, H, W)`` from the pose (else the reference's keypoints); without keypoints the head
    sits where training crops put it (``data.target_head_box``)."""
    from halfbody.data.conditions import region_masks

    kpts = c.pose_kpts if c.pose_kpts is not None else c.ref_kpts
    if kpts is not None:
        return region_masks(kpts, s.height, s.width, s.mask_margins, s.score_threshold, valid=c.valid)
    x0, y0, x1, y1 = s.target_head_box
    m = torch.zeros(1, 1, s.height, s.width)
    m[..., int(y0 * s.height):int(math.ceil(y1 * s.height)), int(x0 * s.width):int(math.ceil(x1 * s.width))] = 1
    return {"mask_lips": m, "mask_face": m, "mask_head": m}


# ================================================================================================ sampling
@contextlib.contextmanager
def _progress(network: torch.nn.Module, total: int, desc: str, enabled: bool) -> Iterator[None]:
    """A bar over the network evaluations (one per context window and step for EchoMimicV2, one per step and clip for
    MirrorMe; CFG branches run as one batch)."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    # every pass is shown (a pass takes far longer than drawing the bar)
    bar = tqdm(total=total, desc=desc, unit="pass", leave=False, dynamic_ncols=True, mininterval=0, miniters=1)

    def count(*_: Any) -> None:  # returns None: a forward hook's return value would replace the output
        bar.update(1)

    handle = network.register_forward_hook(count)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


@torch.no_grad()
def sample(model: torch.nn.Module, c: Conditions, s: Settings, device: torch.device, bf16: bool = False,
           progress: bool = True, desc: str = "") -> np.ndarray:
    """The family's own sampling: uint8 ``(F, H, W, 3)``."""
    from halfbody.data.conditions import PoseRenderer

    g = torch.Generator(device=device).manual_seed(s.seed)
    ref = c.ref[None].to(device)
    audio = torch.from_numpy(np.ascontiguousarray(c.audio16))[None].to(device)
    pose = None
    if c.pose_kpts is not None:
        pose = PoseRenderer(s.pose_groups, s.score_threshold).render(c.pose_kpts, s.height, s.width)[None].to(device)
    masks = {k: v[None].to(device) for k, v in _face_masks(c, s).items()}
    steps = int(s.steps or model.hparams.num_inference_steps)
    with _autocast(model, device, bf16):
        if s.family == "echomimic_v2":
            from halfbody.echomimic_v2.pipeline import context_windows

            windows = len(context_windows(c.num_frames, model.sampler.context_frames, model.sampler.context_overlap))
            batch = {"ref": ref, "audio": audio, "fps": torch.tensor([s.fps]), "pose": pose,
                     **{k: v.expand(1, c.num_frames, *v.shape[2:]) for k, v in masks.items()}}
            with _progress(model.network, windows * steps, desc or "sampling", progress):
                video = model.generate(batch, num_inference_steps=steps, guidance_scale=s.guidance_scale,
                                       generator=g, num_frames=c.num_frames)
        else:
            clip = s.clip_frames
            tf = model.autoencoder.temporal_factor
            overlap = 1 + tf * (s.motion_latent_frames - 1)
            n_clips = 1 + max(0, math.ceil((c.num_frames - clip) / (clip - overlap)))
            with _progress(model.network, n_clips * steps, desc or "sampling", progress):
                out = model.generate_long(ref, audio, s.fps, c.num_frames, clip_frames=clip,
                                          motion_latent_frames=s.motion_latent_frames, pose=pose,
                                          face_mask=masks["mask_face"], num_inference_steps=steps,
                                          guidance_scale=s.guidance_scale, generator=g)
            video = out["video"]
    frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).cpu().numpy()


# ================================================================================================ jobs
def _row_jobs(list_path: str, out_dir: Path) -> tuple[list[Job | str], Path]:
    """The rows of a list file: ``image audio [pose|-] [ground-truth video|-]`` per line, ``#`` comments, paths
    relative to the list file. A row that cannot be parsed becomes its error line."""
    p = _exists(list_path, "list")
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
        ref, audio, pose, gt = (None if c == "-" else str(base / os.path.expanduser(c)) for c in cols)
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
        rows, _ = _row_jobs(str(cfg.list), out_dir)
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
            conditions: Conditions | None = None) -> dict:
    c = conditions if conditions is not None else prepare(job, s)
    for note in c.notes:
        log.warning(note)
    frames = sample(model, c, s, device, _bf16(cfg, device), progress=bool(cfg.get("progress", True)), desc=desc)
    media.write_video(job.output, frames, s.fps, c.audio_out, c.audio_rate)
    return {"frames": int(frames.shape[0]), "seconds": c.audio16.size / media.AUDIO_SAMPLE_RATE}


def generate(cfg: DictConfig) -> dict[str, Any]:
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
        device = _device(cfg)
        _bf16(cfg, device)  # a bad precision value fails here, before any work
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
            model = None  # built at the first row whose inputs are good
            for i, job in enumerate(pending, start=1):
                try:
                    c = prepare(job, s)
                    if model is None:
                        model = build_model(plan).to(device)
                    info = run_job(model, job, s, device, cfg, desc=f"{i}/{len(pending)} {job.output.name}",
                                   conditions=c)
                except (UserError, media.MediaError) as e:
                    line = str(e) if str(e).startswith(job.where) else f"{job.where}: {e}"
                    summary["failed"].append(line)
                    log.error(line)
                    print(f"error: {line}", file=sys.stderr, flush=True)
                    continue
                summary["generated"].append(str(job.output))
                log.info("%s: wrote %s (%d frames)", job.where, job.output, info["frames"])
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


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="generate")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        summary = generate(cfg)
    if summary["failed"]:
        raise SystemExit(2)


if __name__ == "__main__":
    main()
