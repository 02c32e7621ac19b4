"""The model side of a generation run: which model config and checkpoint, the settings ``conf/generate.yaml`` and the
run's config give, building the model with the checkpoint's weights, the device and precision.

Nothing here knows a family by name: a family's module class declares its pipeline (``PIPELINE``), and the
pipeline class says what generation needs (:mod:`halfbody.generation.family`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from halfbody.generation.family import family_pipeline
from halfbody.generation.inputs import existing_file
from halfbody.utils.errors import UserError
from halfbody.utils.hydra import CONFIG_DIR

log = logging.getLogger(__name__)

#: the long-video options conf/generate.yaml offers; a family's pipeline takes those it names (LONG_VIDEO_OPTIONS)
LONG_VIDEO_KEYS = ("clip_frames", "motion_latent_frames")


@dataclass
class Settings:
    """What ``conf/generate.yaml`` and the model's (run) config say about one generation run."""

    family: str  # the family's name, for messages
    pipeline: type  # the family's pipeline class: what generation asks of it (halfbody.generation.family)
    fps: float
    height: int
    width: int
    pose_groups: Any
    mask_margins: dict
    score_threshold: float
    target_head_box: tuple[float, ...]
    long_video: dict  # the pipeline's long-video options (e.g. clip_frames, motion_latent_frames)
    pose_fps: float | None
    pose_policy: str
    crop: str
    silence_dbfs: float
    seed: int
    steps: int | None
    guidance_scale: float | None
    pad_value: int = 0
    pose_extractor: dict = field(default_factory=dict)  # driving videos: data_pipelines.video_to_shards keypoints.*
    pose_model: Any = None  # pose=auto: a callable (audio, fps, num_frames, ...) -> (T, 133, 3) (conf: pose_model)


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
    return existing_file(str(rc), "run_config")


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
            phases = OmegaConf.select(root, "callbacks.curriculum.phases", default=None)
            if phases is not None:  # APDH phases read ${model.phd_loss.schedule.*}: resolve them before it goes
                root.callbacks.curriculum.phases = OmegaConf.create(OmegaConf.to_container(phases, resolve=True))
            model_cfg.phd_loss = None  # a training loss: its extractors' weights are not needed to sample
        if cfg.get("sampler"):
            cls, pipeline = family_pipeline(model_cfg.get("_target_"))
            if pipeline is not None and not pipeline.SAMPLER_VARIANTS:
                raise UserError(f"sampler={cfg.sampler!r}: the {cls.TITLE} family has no sampler variants (it samples "
                                "with its own steps; set steps / guidance_scale)")
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


def settings_from(cfg: DictConfig, source: DictConfig, family: str, pipeline: type,
                  phase: dict | None = None) -> Settings:
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
    options = {"clip_frames": int(cfg.get("clip_frames") or _select(data, "num_frames", 9)),
               "motion_latent_frames": int(cfg.get("motion_latent_frames") or 1)}
    long_video = {k: options[k] for k in pipeline.LONG_VIDEO_OPTIONS}
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
        family=family, pipeline=pipeline, fps=float(fps), height=h, width=w, pose_groups=_plain(pose_groups),
        mask_margins=margins,
        score_threshold=float(_select(data, "score_threshold", 0.3) or 0.3), target_head_box=tuple(thb),
        long_video=long_video, pose_extractor=_plain(cfg.get("pose_extractor")) or {},
        pose_fps=pose_fps, pose_policy=policy, crop=crop,
        silence_dbfs=float(cfg.get("silence_dbfs", -60.0)), seed=int(cfg.get("seed") or 0),
        steps=cfg.get("steps"), guidance_scale=cfg.get("guidance_scale"),
        pose_model=_pose_model(cfg) if str(cfg.get("pose")) == "auto" or cfg.get("list") else None)


def _pose_model(cfg: DictConfig) -> Any:
    """``pose_model`` (pose=auto) instantiated: it loads its checkpoint at its first call."""
    import hydra

    node = cfg.get("pose_model")
    return hydra.utils.instantiate(node) if node is not None and node.get("_target_") else None


# ================================================================================================ model
def use_bf16(cfg: DictConfig, device: torch.device) -> bool:
    precision = str(cfg.get("precision", "auto"))
    if precision not in ("auto", "32", "32-true", "bf16", "bf16-mixed"):
        raise UserError(f"precision={precision!r}: expected auto (bf16-mixed on GPU, 32 on CPU), 32 or bf16-mixed")
    return precision.startswith("bf16") or (precision == "auto" and device.type == "cuda")


@contextlib.contextmanager
def autocast(model: torch.nn.Module, device: torch.device, bf16: bool) -> Iterator[None]:
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
    from halfbody.models.families import FAMILY_TARGETS
    from halfbody.utils.checkpoint_io import check_checkpoint_family, inspect_checkpoint

    ckpt_path = cfg.get("ckpt_path")
    ckpt = None
    if ckpt_path:  # a .ckpt, a consolidated .safetensors, or a sharded (trainer=fsdp) checkpoint directory
        from halfbody.utils.sharded_checkpoint import is_sharded_checkpoint

        sharded = is_sharded_checkpoint(Path(os.path.expanduser(str(ckpt_path))))
        ckpt = inspect_checkpoint(ckpt_path, "ckpt_path", sharded_ok=sharded)  # sharded: its keys, tensors at build
    model_cfg, source, _ = model_config(cfg)
    target = str(model_cfg.get("_target_", ""))
    cls, pipeline = family_pipeline(target)
    if cls is None or pipeline is None:
        raise UserError(f"model._target_={target!r}: not a halfbody model family ({', '.join(FAMILY_TARGETS)})")
    family = cls.FAMILY
    if ckpt is not None:
        check_checkpoint_family(ckpt, ckpt_path, "ckpt_path", target)
    phase = checkpoint_phase(source, ckpt)
    settings = settings_from(cfg, source, family, pipeline, phase[1] if phase else None)
    check_geometry(settings, model_cfg)
    return ModelPlan(model_cfg, settings, ckpt_path, ckpt, phase, cfg.get("audio_region") or None)


def check_geometry(s: Settings, model_cfg: DictConfig) -> None:
    """The resolution (and the family's long-video options, e.g. clip lengths) the autoencoder can take, asked of its
    config (no weights)."""
    from halfbody.utils.startup_checks import autoencoder_factors

    factors = autoencoder_factors(_plain(model_cfg.get("autoencoder")))
    if factors is None:
        return
    spatial, temporal = factors
    if s.height % spatial or s.width % spatial:
        raise UserError(f"resolution=[{s.height}, {s.width}]: the model's autoencoder needs sides divisible by {spatial}")
    try:
        s.pipeline.check_long_video(s.long_video, temporal)
    except ValueError as e:
        raise UserError(str(e)) from None


def build_model(plan: ModelPlan) -> torch.nn.Module:
    """The LightningModule with the checkpoint's weights (strict), or its config's own weights."""
    target = plan.model_cfg.get("_target_")
    log.info("model <%s>", target)
    model = hydra.utils.instantiate(plan.model_cfg)
    if plan.ckpt is not None:
        state = plan.ckpt["state_dict"]
        if any(v is None for v in state.values()):  # a sharded checkpoint: read its shards in this one process
            from halfbody.utils.sharded_checkpoint import read_sharded_state_dict

            try:
                state = read_sharded_state_dict(Path(os.path.expanduser(str(plan.ckpt_path))))
            except Exception as e:  # noqa: BLE001 - any failure to read is reported as what it is
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise UserError(f"ckpt_path={str(plan.ckpt_path)!r}: the sharded checkpoint's tensors cannot be read "
                                f"({type(e).__name__}: {first}); or consolidate it first: python -m "
                                f"halfbody.consolidate {plan.ckpt_path}") from None
        try:
            result = model.load_state_dict(state, strict=False)
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
