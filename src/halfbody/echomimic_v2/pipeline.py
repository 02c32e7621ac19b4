"""EchoMimicV2Pipeline: sampling as the released EchoMimicV2 does it (one pipeline for validation and ``generate``).

What the release's pipelines (``src/pipelines/pipeline_echomimicv2.py`` and ``pipeline_echomimicv2_acc.py``,
``context.py``, ``step_func.py``, ``infer.py`` / ``infer_acc.py``) do, restated here (our code, their arithmetic):

- **Initial noise**: standard normal latents clamped to ``[-1.5, 1.5]`` (``prepare_latents_smooth``), times the
  scheduler's ``init_noise_sigma`` (1 for DDIM).
- **Context windows** for clips of any length: the "uniform" schedule at stride 1, evaluated once: windows of
  ``context_frames`` (12) frames starting every ``context_frames - context_overlap`` (9) frames, *closed loop* (a
  window running past the end wraps to the first frames); a clip of at most 12 frames is one window. At denoising
  step ``i`` every window is rotated by ``i * context_shift`` (3) frames modulo the clip length.
- **Blending**: each step, every window's prediction is added into a clip-sized buffer and each frame is divided by
  the number of windows that covered it (a plain average over overlaps), then classifier-free guidance, then one
  scheduler step for the whole clip.
- **CFG** (``guidance_scale > 1``): the unconditional branch has no reference (its self-attention does not read the
  ReferenceNet bank), zero audio features (so each ``attn2`` still adds its gained out-projection bias) and zero pose
  features; ``1`` runs the conditional branch alone.
- **The ReferenceNet** runs once per clip on the clean reference (timestep 0); its bank is reused by every window
  and step. So are the pose encoder's residuals (the release encodes the pose once, before its loop) and the audio
  features; the unconditional branch reuses them (zeroed by its keep masks).
- **Step function**: ``ddim`` (diffusers ``DDIMScheduler.step`` with the release's scheduler config), or
  ``release_acc`` (the accelerated pipeline: each window's v-prediction becomes ``x0 = a_t x_t - b_t v`` and then
  the pseudo-velocity towards ``t = -1``, :func:`halfbody.models.schedulers.pseudo_velocity`, before blending).
  ``infer_acc.py`` runs it with the ``_acc`` weights, 6 steps and CFG 1.0 (``model/sampler=release_acc``).

One difference on purpose: the base release pipeline does not divide the blended prediction by the window count
when ``guidance_scale <= 1`` (overlapping frames get the *sum*); its accelerated pipeline does. We always average.

Latents are ``(B, F, C, h, w)`` (frames before channels, unlike the release's ``(B, C, F, h, w)``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Union

import torch
from torch import nn

from halfbody.models.schedulers import VPredictionDDIM, apply_cfg, pseudo_velocity, x0_from_velocity

__all__ = ["SamplerSettings", "EchoMimicV2Pipeline", "context_windows", "step_windows", "sample_with_windows",
           "WindowDenoiseFn", "WindowFrames", "STEP_FUNCTIONS"]

STEP_FUNCTIONS = ("ddim", "release_acc")

#: ``denoise_fn(x_w, t, frames, with_uncond)``: ``x_w`` ``(B, f, C, h, w)`` the latents of one window, ``t`` ``(B,)``
#: long, ``frames`` the window's frame indices into the clip (length ``f``; a :class:`WindowFrames` list that also
#: holds them on the device). Returns ``v_cond`` when ``with_uncond``
#: is False, else ``(v_cond, v_uncond)``.
WindowDenoiseFn = Callable[[torch.Tensor, torch.Tensor, list[int], bool],
                           Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class SamplerSettings:
    """How a clip is sampled (``model.sampler``; ``conf/model/sampler/*.yaml``).

    Args:
        name: a label (``release`` | ``release_acc``), for logs.
        step: ``ddim`` | ``release_acc`` (see the module docstring).
        context_frames: frames per window (release: 12).
        context_overlap: frames shared by consecutive windows (release: 3).
        context_shift: frames every window rotates by per denoising step (release: 3; 0 keeps windows fixed).
        initial_noise_clamp: clamp of the initial noise (release: 1.5); ``None`` leaves it unclamped.
        eta: DDIM stochasticity (release: 0).

    Windows go through the network one at a time (the release's ``context_batch_size=1``).
    """

    name: str = "release"
    step: str = "ddim"
    context_frames: int = 12
    context_overlap: int = 3
    context_shift: int = 3
    initial_noise_clamp: float | None = 1.5
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.step not in STEP_FUNCTIONS:
            raise ValueError(f"model.sampler.step must be one of {STEP_FUNCTIONS}, got {self.step!r}")
        if self.context_frames < 1:
            raise ValueError(f"model.sampler.context_frames must be >= 1, got {self.context_frames}")
        if not 0 <= self.context_overlap < self.context_frames:
            raise ValueError(f"model.sampler.context_overlap must be in [0, context_frames={self.context_frames}), "
                             f"got {self.context_overlap}")
        if self.context_shift < 0:
            raise ValueError(f"model.sampler.context_shift must be >= 0, got {self.context_shift}")
        if self.initial_noise_clamp is not None and not self.initial_noise_clamp > 0:
            raise ValueError(f"model.sampler.initial_noise_clamp must be > 0 or null, got {self.initial_noise_clamp}")

    @classmethod
    def from_config(cls, config: "SamplerSettings | Mapping[str, Any] | None") -> "SamplerSettings":
        if config is None:
            return cls()
        if isinstance(config, SamplerSettings):
            return config
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"model.sampler has unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: config[k] for k in config})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def context_windows(num_frames: int, context_frames: int = 12, context_overlap: int = 3) -> list[list[int]]:
    """The release's windows before rotation: ``context_frames``-frame windows starting every
    ``context_frames - context_overlap`` frames, wrapping past the end (closed loop); one window of every frame
    when the clip is not longer than a window."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames <= context_frames:
        return [list(range(num_frames))]
    hop = context_frames - context_overlap
    return [[(start + k) % num_frames for k in range(context_frames)] for start in range(0, num_frames, hop)]


def step_windows(windows: list[list[int]], step_index: int, shift: int, num_frames: int) -> list[list[int]]:
    """The windows of denoising step ``step_index``: every frame index rotated by ``step_index * shift``."""
    return [[(f + step_index * shift) % num_frames for f in w] for w in windows]


@torch.no_grad()
def sample_with_windows(denoise_fn: WindowDenoiseFn, scheduler: VPredictionDDIM, shape: tuple[int, ...],
                        settings: SamplerSettings, num_steps: int, guidance_scale: float,
                        generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                        callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """The release's denoising loop over context windows; returns ``x0`` latents of ``shape`` ``(B, F, C, h, w)``.

    Args:
        denoise_fn: see :data:`WindowDenoiseFn`.
        scheduler: the DDIM schedule (its diffusers ``DDIMScheduler`` steps the whole clip).
        shape: latent shape; ignored when ``latents`` is given.
        settings: windows, step function, noise clamp, eta.
        num_steps / guidance_scale: DDIM steps and the CFG scale (1: conditional branch only).
        generator: for the initial noise (drawn on the generator's device) and ``eta > 0`` noise.
        latents: optional initial noise ``x_T`` (used as given: no clamp).
        callback: ``callback(step_index, t, x_t)`` after each step.
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    sched = copy.deepcopy(scheduler.scheduler)
    sched.set_timesteps(num_steps)
    if latents is None:
        gen_device = generator.device if generator is not None else "cpu"
        latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        if settings.initial_noise_clamp is not None:
            latents = latents.clamp(-settings.initial_noise_clamp, settings.initial_noise_clamp)
        latents = latents * sched.init_noise_sigma
    x = latents.to(device=device if device is not None else latents.device, dtype=dtype)
    if x.ndim != 5:
        raise ValueError(f"latents must be (B, F, C, h, w), got shape {tuple(x.shape)}")
    b, nf = x.shape[:2]
    with_uncond = guidance_scale != 1.0
    base = context_windows(nf, settings.context_frames, settings.context_overlap)
    alphas_cumprod = scheduler.scheduler.alphas_cumprod.to(x.device)
    # windows are blended in float32 at least (half-precision runs), in float64 when the latents are float64
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    # every step's windows, their frame indices and per-frame counts go to the device once: indexing with Python
    # lists inside the loop would copy (and synchronise) for every window of every step
    timesteps = [int(t) for t in sched.timesteps]
    windows = [step_windows(base, i, settings.context_shift, nf) for i in range(len(timesteps))]
    index = torch.tensor(windows, dtype=torch.long).to(x.device)  # (steps, windows, frames per window)
    counts = torch.zeros(len(timesteps), nf, dtype=acc_dtype)
    for i, ws in enumerate(windows):
        for w in ws:
            counts[i, w] += 1
    counts = counts.to(x.device).view(len(timesteps), 1, 1, nf, 1, 1, 1)
    branches = 2 if with_uncond else 1
    for i, t_int in enumerate(timesteps):
        t_batch = torch.full((b,), t_int, device=x.device, dtype=torch.long)
        total = torch.zeros((branches, *x.shape), device=x.device, dtype=acc_dtype)
        for j, w in enumerate(windows[i]):
            frames = WindowFrames(w, index[i, j])
            x_w = x.index_select(1, frames.on_device)
            preds = _as_branches(denoise_fn(x_w, t_batch, frames, with_uncond), with_uncond)
            if settings.step == "release_acc":  # v -> x0 -> pseudo-velocity towards t = -1 (step_func.py)
                preds = [pseudo_velocity(x_w, x0_from_velocity(p, x_w, alphas_cumprod, t_batch), alphas_cumprod,
                                         t_batch, torch.full_like(t_batch, -1)) for p in preds]
            for branch, p in enumerate(preds):
                total[branch].index_add_(1, frames.on_device, p.to(acc_dtype))  # a window's frames are distinct
        v = total / counts[i]
        v = apply_cfg(v[0], v[1], guidance_scale) if with_uncond else v[0]
        x = sched.step(v.to(x.dtype), t_int, x, eta=settings.eta, generator=generator).prev_sample
        if callback is not None:
            callback(i, t_int, x)
    return x


class WindowFrames(list):
    """A window's frame indices into the clip (a ``list`` of ints), with the same indices as a ``LongTensor`` on the
    latents' device (``on_device``), so that a denoiser slices its conditions without a host-to-device copy."""

    def __init__(self, frames: list[int], on_device: torch.Tensor):
        super().__init__(frames)
        self.on_device = on_device


def _as_branches(out: Any, with_uncond: bool) -> list[torch.Tensor]:
    if with_uncond:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError("denoise_fn(x_w, t, frames, with_uncond=True) must return (v_cond, v_uncond)")
        return [out[0], out[1]]
    return [out[0] if isinstance(out, (tuple, list)) else out]


class EchoMimicV2Pipeline:
    """Sampling with the EchoMimicV2 network as released (the diffusers pattern: components + ``__call__``).

    Args:
        network: an :class:`~halfbody.echomimic_v2.network.EchoMimicV2Network`.
        scheduler: the :class:`VPredictionDDIM` (the release's scheduler config in the EchoMimicV2 presets).
        settings: :class:`SamplerSettings` or a mapping of its fields (``model.sampler``).
        autoencoder: optional; needed by :meth:`__call__` (pixels in and out), not by :meth:`sample_latents`.
    """

    # --- what ``python -m halfbody.generate`` asks of a family (halfbody.generation.family), without a model
    POSE_REQUIRED = True  # the pose sequence drives the body (EchoMimicV2 §3.2)
    MISSING_POSE = ("EchoMimicV2 animates a pose sequence; give pose=<(T, 133, 3) keypoints .npy or a driving video>, "
                    "or pose=auto with pose_model.ckpt_path=<an audio-to-pose run's checkpoint> (docs/AUDIO2POSE.md)")
    SAMPLER_VARIANTS = True  # conf/model/sampler/: release | release_acc
    LONG_VIDEO_OPTIONS: tuple[str, ...] = ()  # any length through the sampler's context windows

    @staticmethod
    def check_long_video(options: Mapping[str, Any], temporal_factor: int) -> None:
        """Nothing to check: context windows take any frame count."""

    def __init__(self, network: nn.Module, scheduler: VPredictionDDIM,
                 settings: SamplerSettings | Mapping[str, Any] | None = None, autoencoder: nn.Module | None = None):
        self.network = network
        self.scheduler = scheduler
        self.settings = SamplerSettings.from_config(settings)
        self.autoencoder = autoencoder

    def network_passes(self, num_frames: int, num_inference_steps: int, **_: Any) -> int:
        """Network evaluations a clip takes: one per context window and step (the CFG branches are one batch)."""
        return len(context_windows(int(num_frames), self.settings.context_frames, self.settings.context_overlap)) \
            * int(num_inference_steps)

    def window_denoiser(self, ref_latents: torch.Tensor, audio_feats: torch.Tensor | None, pose: torch.Tensor | None,
                        audio_mask: torch.Tensor | None = None, audio_mode: str = "global",
                        with_uncond: bool = True) -> WindowDenoiseFn:
        """The :data:`WindowDenoiseFn` of one clip: each window reads its frames' audio features, pose maps and
        region masks. The unconditional branch hides the reference and zeroes audio and pose (the release)."""
        b = ref_latents.shape[0]
        net = self.network
        bank = net.encode_reference(ref_latents)  # once per clip (the release: reference pass at the first step)
        # the pose encoder's residuals: once per clip too (the release encodes the pose before its loop)
        pose_feats = None if pose is None else net.encode_pose(pose, dtype=ref_latents.dtype)
        if with_uncond:
            ref2 = torch.cat([ref_latents, ref_latents])
            bank2 = {k: torch.cat([v, v]) for k, v in bank.items()}
            keep = torch.cat([torch.ones(b, dtype=torch.bool, device=ref_latents.device),
                              torch.zeros(b, dtype=torch.bool, device=ref_latents.device)])

        def take(x: torch.Tensor | None, frames: list[int]) -> torch.Tensor | None:
            if x is None:
                return None
            on_device = getattr(frames, "on_device", None)  # WindowFrames from sample_with_windows: no copy
            return x.index_select(1, on_device) if on_device is not None else x[:, frames]

        def denoise(x_w: torch.Tensor, t: torch.Tensor, frames: list[int], uncond: bool):
            feats, p, mask = take(audio_feats, frames), take(pose_feats, frames), take(audio_mask, frames)
            if not uncond:
                out = net(x_w, t, ref_latents, feats, None, audio_mask=mask, audio_mode=audio_mode,
                          reference_bank=bank, pose_features=p)
                return self.scheduler.as_velocity(out, x_w, t)
            cat = lambda v: None if v is None else torch.cat([v, v])  # noqa: E731
            # one batch of 2B: conditional first, then the unconditional branch (no reference, audio or pose)
            # audio_keep False: the network drops audio as released (zero audio tokens into attn2)
            out = net(torch.cat([x_w, x_w]), torch.cat([t, t]), ref2, cat(feats), None, audio_mask=cat(mask),
                      audio_mode=audio_mode, ref_keep=keep, audio_keep=keep, pose_keep=keep, reference_bank=bank2,
                      pose_features=cat(p))
            return self.scheduler.as_velocity(out, torch.cat([x_w, x_w]), torch.cat([t, t])).chunk(2)

        return denoise

    @torch.no_grad()
    def sample_latents(self, ref_latents: torch.Tensor, audio_feats: torch.Tensor | None, pose: torch.Tensor | None,
                       num_frames: int, *, num_inference_steps: int, guidance_scale: float,
                       audio_mask: torch.Tensor | None = None, audio_mode: str = "global",
                       generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                       callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Sample ``(B, num_frames, C, h, w)`` latents.

        Args:
            ref_latents: ``(B, C, h, w)`` clean reference latents.
            audio_feats: ``(B, >= num_frames, K, D)`` per-frame audio features (``None`` with ``audio_mode="off"``).
            pose: ``(B, >= num_frames, C_pose, H, W)`` pose maps, or ``None`` (no pose condition).
            num_frames: frames to generate, any number (context windows cover clips longer than one window).
            audio_mask: ``(B, >= num_frames, 1, H, W)`` region mask for ``audio_mode="masked"``.
        """
        if ref_latents.ndim != 4:
            raise ValueError(f"ref_latents must be (B, C, h, w), got shape {tuple(ref_latents.shape)}")
        num_frames = int(num_frames)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        b = ref_latents.shape[0]
        for name, x in (("audio_feats", audio_feats), ("pose", pose), ("audio_mask", audio_mask)):
            if x is not None and (x.shape[0] != b or x.shape[1] < num_frames):
                raise ValueError(f"{name} must cover (B={b}, >= {num_frames} frames, ...), got shape {tuple(x.shape)}")
        cut = lambda x: None if x is None else x[:, :num_frames]  # noqa: E731
        with_uncond = guidance_scale != 1.0
        fn = self.window_denoiser(ref_latents, cut(audio_feats), cut(pose), cut(audio_mask), audio_mode, with_uncond)
        shape = (b, num_frames, *ref_latents.shape[1:])
        return sample_with_windows(fn, self.scheduler, shape, self.settings, num_inference_steps, guidance_scale,
                                   generator=generator, latents=latents, device=ref_latents.device,
                                   dtype=ref_latents.dtype, callback=callback)

    @torch.no_grad()
    def __call__(self, ref: torch.Tensor, audio_feats: torch.Tensor | None, pose: torch.Tensor | None,
                 num_frames: int, **kwargs: Any) -> torch.Tensor:
        """Pixels in, pixels out: ``ref`` ``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, num_frames, 3, H, W)`` in
        ``[-1, 1]``. Keyword arguments as :meth:`sample_latents`."""
        if self.autoencoder is None:
            raise ValueError("EchoMimicV2Pipeline(autoencoder=None) samples latents only: use sample_latents")
        ref_latents = self.autoencoder.encode_image(ref)
        latents = self.sample_latents(ref_latents, audio_feats, pose, num_frames, **kwargs)
        return self.autoencoder.decode(latents).clamp(-1, 1)
