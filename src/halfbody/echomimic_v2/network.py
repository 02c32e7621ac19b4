"""EchoMimicV2Network: the boxes of EchoMimicV2 Figure 2 wired together (paper §3.1–3.4).

    ref latent ──► ReferenceNet (write mode) ──(bank of attn1 inputs)─┐
    pose maps ───► PoseEncoder ──(added after conv_in)──┐             │
    noisy latents ──────────────────────────────────────► DenoisingUNet ──► prediction
    audio feats ──(attn2 keys/values, x3.0, optional region mask)───────┘   (+ 21 motion modules)

The layout is the released one (antgroup/echomimic_v2): audio features enter every block's ``attn2`` directly
(``audio_attention="direct"``, 384-dim keys/values for whisper-tiny, output gain 3.0), motion modules after every
block layer, a ReferenceNet without cross-attention. ``audio_attention="projection"`` (an ablation) puts the
project's earlier MLP (:class:`AudioProjection`) in front of an ``attn2`` of the UNet's own ``cross_attention_dim``.
The state dict keys are the release's (``reference_net.unet.<reference_unet.pth key>``,
``denoising_unet.unet.<denoising_unet.pth / motion_module.pth key>``, ``pose_encoder.<pose_encoder.pth key>``);
:mod:`halfbody.echomimic_v2.official` imports and exports the release's files.

Presets: :meth:`EchoMimicV2Network.tiny` (random weights, CPU-fast) and :meth:`EchoMimicV2Network.from_pretrained_parts`
(SD1.5 / sd-image-variations UNet from a local directory). :meth:`save_pretrained` / :meth:`from_pretrained` store
the whole network as ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from halfbody.utils.io import atomic_output
from halfbody.models.pretrained import PretrainedNotFoundError, load_pretrained, require_pretrained_dir

from .attention_processors import AUDIO_MODES, AttentionContext, region_tokens_by_length, token_grids
from .audio_projection import AudioProjection
from .denoising_unet import DenoisingUNet
from .pose_encoder import PoseEncoder
from .reference_net import ReferenceNet
from halfbody.utils.containers import to_plain

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEMPORAL_WEIGHTS_NAME = "temporal.safetensors"
UNET_LAYOUT = ("a diffusers UNet2DConditionModel directory (config.json + diffusion_pytorch_model.safetensors or "
               ".bin), e.g. the unet/ folder of SD1.5 or sd-image-variations")
UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
GROUP_NAMES = ("reference_net", "denoising_unet", "pose_encoder", "audio_attention", "temporal")
AUDIO_ATTENTION = ("direct", "projection")

# The UNet of sd-image-variations-diffusers (= SD1.5's layout with 768-dim image-embedding cross-attention), from
# which the release builds both UNets; for shape-only builds (meta device) without the directory.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
# The release's motion modules (configs/inference/inference_v2.yaml, motion_module_kwargs) and audio gain
# (audio_feature_ratio in src/models/mutual_self_attention.py).
RELEASE_TEMPORAL = dict(temporal_num_attention_heads=8, temporal_num_layers=1, temporal_num_attentions=2,
                        temporal_max_frames=32, temporal_norm_num_groups=32)
RELEASE_AUDIO_GAIN = 3.0


def unet_weights_present(directory: str | os.PathLike) -> bool:
    """A diffusers UNet snapshot in ``directory``: ``config.json`` plus ``.safetensors`` or ``.bin`` weights."""
    d = Path(directory)
    return (d / "config.json").exists() and any((d / w).exists() for w in UNET_WEIGHTS)


def tiny_unet_config(latent_channels: int = 48, cross_attention_dim: int = 64,
                     block_out_channels: tuple[int, int] = (32, 64)) -> dict[str, Any]:
    """A small SD1.5-shaped UNet config: 2 resolutions (32, 64 channels by default), 1 layer per block, 4 and 8 heads."""
    return dict(
        sample_size=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(4, 8),  # diffusers' legacy name: the number of heads -> 8 channels per head
        cross_attention_dim=cross_attention_dim,
    )


def _unet_config_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly copy of a diffusers (or Hydra) UNet config without its private ``_`` keys."""
    return {k: v for k, v in to_plain(config).items() if not k.startswith("_")}


def _load_unet_dir(path: str | os.PathLike | None, key: str) -> UNet2DConditionModel:
    """A diffusers UNet snapshot (``.safetensors`` or ``.bin`` weights) from the directory of config key ``key``."""
    d = require_pretrained_dir(path, key, UNET_LAYOUT, ("config.json",))
    if not any((d / w).exists() for w in UNET_WEIGHTS):
        raise PretrainedNotFoundError(f"config key {key!r} points to {str(d)!r}, which lacks weights (one of "
                                      f"{list(UNET_WEIGHTS)}): expected {UNET_LAYOUT}")
    use_safetensors = (d / UNET_WEIGHTS[0]).exists()
    return load_pretrained(UNet2DConditionModel, d, key, UNET_LAYOUT, use_safetensors=use_safetensors)


def denoiser_unet_config(unet_config: Any, audio_dim: int, audio_attention: str = "direct") -> dict[str, Any]:
    """The denoiser's UNet config: the base one, with ``attn2`` taking the audio features directly (the release's
    ``unet_additional_kwargs.cross_attention_dim: 384``) when ``audio_attention="direct"``."""
    cfg = _unet_config_dict(unet_config)
    return {**cfg, "cross_attention_dim": audio_dim} if audio_attention == "direct" else cfg


def _as_keep(keep: torch.Tensor | None, b: int, name: str, device: torch.device) -> torch.Tensor | None:
    if keep is None:
        return None
    keep = torch.as_tensor(keep, device=device)
    if keep.shape != (b,):
        raise ValueError(f"{name} must have shape ({b},), got {tuple(keep.shape)}")
    return keep


class EchoMimicV2Network(nn.Module):
    """ReferenceNet + Denoising UNet (reference/audio attention, temporal modules) + Pose Encoder + Audio Projection.

    Args:
        unet_config: ``UNet2DConditionModel`` config of the base UNet (SD1.5-shaped); the ReferenceNet is built
            from it as is, the denoiser with ``cross_attention_dim = audio_dim`` when ``audio_attention="direct"``.
        audio_dim: ``D`` of the audio features.
        audio_tokens: ``K``, audio tokens per video frame.
        latent_factor: spatial factor of the autoencoder (pose map pixels per latent pixel): 8 for SD's VAE.
        audio_attention: ``"direct"`` (released: the ``K`` audio tokens are ``attn2``'s keys/values) or
            ``"projection"`` (ablation: an :class:`AudioProjection` MLP maps them to the UNet's width first).
        audio_gain: factor on every ``attn2`` output (released: 3.0).
        audio_context_tokens: ``K'`` context tokens per frame of the projection (``None``: ``K``).
        audio_hidden_dim: width of the audio projection MLP (``None``: ``cross_attention_dim``).
        pose_channels: channels of the pose map.
        pose_block_out_channels: pose encoder widths, ``log2(latent_factor) + 1`` of them (``None``: default).
        temporal: insert motion modules into the denoiser.
        temporal_num_attention_heads, temporal_num_layers, temporal_num_attentions, temporal_max_frames,
            temporal_norm_num_groups: motion module shape (released: 8, 1, 2, 32, 32).
        unets: prebuilt ``(reference_unet, denoising_unet)`` to use instead of fresh ones from ``unet_config``
            (how :meth:`from_pretrained_parts` passes pretrained weights); not part of the saved config.
    """

    def __init__(self, unet_config: dict[str, Any], audio_dim: int, audio_tokens: int, *, latent_factor: int = 8,
                 audio_attention: str = "direct", audio_gain: float = RELEASE_AUDIO_GAIN,
                 audio_context_tokens: int | None = None, audio_hidden_dim: int | None = None, pose_channels: int = 3,
                 pose_block_out_channels: list[int] | tuple[int, ...] | None = None, temporal: bool = True,
                 temporal_num_attention_heads: int = 8, temporal_num_layers: int = 1, temporal_num_attentions: int = 2,
                 temporal_max_frames: int = 32, temporal_norm_num_groups: int = 32,
                 unets: tuple[UNet2DConditionModel, UNet2DConditionModel] | None = None):
        super().__init__()
        if audio_attention not in AUDIO_ATTENTION:
            raise ValueError(f"audio_attention must be one of {AUDIO_ATTENTION}, got {audio_attention!r}")
        unet_config = _unet_config_dict(unet_config)
        self.config: dict[str, Any] = dict(
            unet_config=unet_config, audio_dim=audio_dim, audio_tokens=audio_tokens, latent_factor=latent_factor,
            audio_attention=audio_attention, audio_gain=audio_gain,
            audio_context_tokens=audio_context_tokens, audio_hidden_dim=audio_hidden_dim, pose_channels=pose_channels,
            pose_block_out_channels=to_plain(pose_block_out_channels),
            temporal=temporal, temporal_num_attention_heads=temporal_num_attention_heads,
            temporal_num_layers=temporal_num_layers, temporal_num_attentions=temporal_num_attentions,
            temporal_max_frames=temporal_max_frames, temporal_norm_num_groups=temporal_norm_num_groups)
        if unets is None:
            unets = (UNet2DConditionModel.from_config(unet_config),
                     UNet2DConditionModel.from_config(denoiser_unet_config(unet_config, audio_dim, audio_attention)))
        ref_unet, den_unet = unets
        if ref_unet is den_unet:
            raise ValueError("the ReferenceNet and the denoiser need two UNet instances (copy the pretrained one)")
        self.latent_channels: int = den_unet.config.in_channels
        self.latent_factor = latent_factor
        self.audio_attention = audio_attention
        cross_dim = den_unet.config.cross_attention_dim
        if audio_attention == "direct" and cross_dim != audio_dim:
            raise ValueError(f"audio_attention='direct': the denoiser's attn2 takes {cross_dim}-dim keys/values but the "
                             f"audio features are {audio_dim}-dim (build it with denoiser_unet_config)")

        self.reference_net = ReferenceNet(ref_unet)
        self.denoising_unet = DenoisingUNet(
            den_unet, temporal=temporal, temporal_num_attention_heads=temporal_num_attention_heads,
            temporal_num_layers=temporal_num_layers, temporal_num_attentions=temporal_num_attentions,
            temporal_max_frames=temporal_max_frames, temporal_norm_num_groups=temporal_norm_num_groups,
            audio_gain=audio_gain)
        if self.reference_net.bank_keys != self.denoising_unet.block_keys:
            raise ValueError("ReferenceNet and denoising UNet have different transformer layouts; use the same UNet config")
        self.pose_encoder = PoseEncoder(den_unet.config.block_out_channels[0], latent_factor=latent_factor,
                                        pose_channels=pose_channels, block_out_channels=pose_block_out_channels)
        self.audio_projection = (AudioProjection(audio_dim, audio_tokens, cross_dim, context_tokens=audio_context_tokens,
                                                 hidden_dim=audio_hidden_dim)
                                 if audio_attention == "projection" else None)

    # ------------------------------------------------------------------ presets

    @classmethod
    def tiny(cls, latent_channels: int = 48, latent_factor: int = 4, audio_dim: int = 384, audio_tokens: int = 10,
             block_out_channels: tuple[int, int] = (32, 64), **kwargs: Any) -> "EchoMimicV2Network":
        """Random-weight CPU preset (for the patch autoencoder: 48 channels, factor 4 -> 16x16 latents at 64x64)."""
        stages = int(round(math.log2(latent_factor)))
        kwargs.setdefault("pose_block_out_channels", [min(8 * 2 ** i, 64) for i in range(stages + 1)])
        kwargs.setdefault("temporal_num_attention_heads", 4)
        kwargs.setdefault("temporal_norm_num_groups", 8)
        if kwargs.get("audio_attention") == "projection":
            kwargs.setdefault("audio_hidden_dim", 64)
        return cls(tiny_unet_config(latent_channels, block_out_channels=block_out_channels), audio_dim, audio_tokens,
                   latent_factor=latent_factor, **kwargs)

    @classmethod
    def from_pretrained_parts(cls, unet_dir: str | os.PathLike | None, *, audio_dim: int, audio_tokens: int,
                              key_prefix: str = "model.network", reference_unet_dir: str | os.PathLike | None = None,
                              temporal_dir: str | os.PathLike | None = None, latent_channels: int | None = None,
                              **kwargs: Any) -> "EchoMimicV2Network":
        """Paper-scale network from local pretrained parts (nothing downloads).

        Args:
            unet_dir: config key ``{key_prefix}.unet_dir``: a diffusers ``UNet2DConditionModel`` directory (SD1.5 /
                sd-image-variations ``unet/``); initialises the denoiser, and the ReferenceNet too unless
                ``reference_unet_dir`` is given.
            audio_dim, audio_tokens: ``D`` and ``K`` of the audio features.
            key_prefix: dotted config prefix quoted in errors, e.g. ``model.network``.
            reference_unet_dir: config key ``{key_prefix}.reference_unet_dir``: another UNet directory of the same
                layout for the ReferenceNet (``None``: copy of ``unet_dir``).
            temporal_dir: config key ``{key_prefix}.temporal_dir``: a directory with ``temporal.safetensors`` written
                by :meth:`save_temporal` (``None``: fresh, zero-initialised temporal modules).
            latent_channels: if given, must match the UNet's ``in_channels`` (4 for SD's VAE).
            **kwargs: further constructor arguments (``latent_factor`` defaults to 8).
        """
        unet = _load_unet_dir(unet_dir, f"{key_prefix}.unet_dir")
        if reference_unet_dir is not None:
            ref_unet = _load_unet_dir(reference_unet_dir, f"{key_prefix}.reference_unet_dir")
            for k in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                      "transformer_layers_per_block", "in_channels", "cross_attention_dim"):
                if ref_unet.config.get(k) != unet.config.get(k):
                    raise ValueError(f"{key_prefix}.reference_unet_dir: UNet config {k!r} differs from "
                                     f"{key_prefix}.unet_dir ({ref_unet.config.get(k)!r} vs {unet.config.get(k)!r})")
        else:
            ref_unet = copy.deepcopy(unet)
        if latent_channels is not None and latent_channels != unet.config.in_channels:
            raise ValueError(f"{key_prefix}.unet_dir: UNet in_channels={unet.config.in_channels} does not match "
                             f"latent_channels={latent_channels} of the autoencoder")
        den_config = denoiser_unet_config(unet.config, audio_dim, kwargs.get("audio_attention", "direct"))
        if den_config["cross_attention_dim"] != unet.config.cross_attention_dim:
            # As released (EMOUNet3DConditionModel.from_pretrained_2d): every base weight of matching shape is
            # loaded; attn2's to_k / to_v (audio-width keys/values) start fresh.
            den_unet = UNet2DConditionModel.from_config(den_config)
            base = unet.state_dict()
            target = den_unet.state_dict()
            fresh = [k for k in target if k not in base or base[k].shape != target[k].shape]
            if any(not (".attn2.to_k." in k or ".attn2.to_v." in k) for k in fresh):
                raise ValueError(f"{key_prefix}.unet_dir: unexpected layout for the audio denoiser: {fresh[:5]}")
            den_unet.load_state_dict({k: v for k, v in base.items() if k not in fresh}, strict=False)
            del unet
            unet = den_unet
        kwargs.setdefault("latent_factor", 8)
        net = cls(ref_unet.config, audio_dim, audio_tokens, unets=(ref_unet, unet), **kwargs)
        if temporal_dir is not None:
            path = require_pretrained_dir(temporal_dir, f"{key_prefix}.temporal_dir",
                                          f"a directory with {TEMPORAL_WEIGHTS_NAME} (EchoMimicV2Network.save_temporal)",
                                          (TEMPORAL_WEIGHTS_NAME,))
            net.load_temporal(path, key=f"{key_prefix}.temporal_dir")
        return net

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (the full state dict) into ``directory``."""
        d = Path(directory)
        with atomic_output(d / WEIGHTS_NAME) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
        with atomic_output(d / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps({"_class_name": type(self).__name__, **self.config}, indent=2))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike | None,
                        key: str = "model.network.pretrained_dir") -> "EchoMimicV2Network":
        """Load a network written by :meth:`save_pretrained` (safetensors only; strict key match)."""
        d = require_pretrained_dir(directory, key, f"a directory with {CONFIG_NAME} + {WEIGHTS_NAME} written by "
                                   "EchoMimicV2Network.save_pretrained", (CONFIG_NAME, WEIGHTS_NAME))
        config = json.loads((d / CONFIG_NAME).read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        with torch.device("meta"):  # shapes only: the weights come from the file (no random init of 2B params)
            net = cls(**config)
        net.load_state_dict(load_file(str(d / WEIGHTS_NAME)), strict=True, assign=True)
        left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"{d / WEIGHTS_NAME}: network tensors not in the file: {left[:5]}")
        return net

    def save_temporal(self, directory: str | os.PathLike) -> Path:
        """Write the temporal modules' weights to ``directory/temporal.safetensors`` (for ``temporal_dir``)."""
        d = Path(directory)
        with atomic_output(d / TEMPORAL_WEIGHTS_NAME) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self._temporal_state().items()}, str(tmp))
        return d

    def load_temporal(self, directory: str | os.PathLike, key: str = "model.network.temporal_dir") -> None:
        state = load_file(str(Path(directory) / TEMPORAL_WEIGHTS_NAME))
        expected = self._temporal_state()
        if set(state) != set(expected):
            raise ValueError(f"config key {key!r}: {TEMPORAL_WEIGHTS_NAME} does not match this network's temporal "
                             f"modules ({len(set(state) ^ set(expected))} keys differ)")
        with torch.no_grad():
            for k, v in state.items():
                if v.shape != expected[k].shape:
                    raise ValueError(f"config key {key!r}: {k} has shape {tuple(v.shape)}, expected "
                                     f"{tuple(expected[k].shape)}")
                expected[k].copy_(v)

    def _temporal_state(self) -> dict[str, torch.Tensor]:
        ids = {id(p) for m in self.module_groups()["temporal"] for p in m.parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) in ids}

    # ------------------------------------------------------------------ groups / switches

    def module_groups(self) -> dict[str, list[nn.Module]]:
        """Disjoint module groups covering every parameter, for freezing / unfreezing / muting by phase.

        ``reference_net``; ``denoising_unet`` (spatial UNet without audio attention and temporal modules);
        ``pose_encoder``; ``audio_attention`` (``norm2`` + ``attn2`` of every spatial block, and the audio projection
        if any); ``temporal`` (the motion modules).
        """
        audio = [*([self.audio_projection] if self.audio_projection is not None else []),
                 *self.denoising_unet.audio_attention_modules()]
        temporal: list[nn.Module] = list(self.denoising_unet.temporal_modules())
        excluded = {id(m) for m in audio + temporal}

        def rest(m: nn.Module) -> list[nn.Module]:
            if id(m) in excluded:
                return []
            if not any(id(d) in excluded for d in m.modules()):
                return [m] if any(True for _ in m.parameters()) else []
            if any(True for _ in m.parameters(recurse=False)):
                raise RuntimeError(f"{type(m).__name__} holds parameters next to grouped submodules")
            return [x for c in m.children() for x in rest(c)]

        return {
            "reference_net": [self.reference_net],
            "denoising_unet": rest(self.denoising_unet),
            "pose_encoder": [self.pose_encoder],
            "audio_attention": audio,
            "temporal": temporal,
        }

    def enable_gradient_checkpointing(self) -> None:
        """diffusers activation checkpointing in both UNets (transformer blocks, resnets, temporal blocks)."""
        self.reference_net.unet.enable_gradient_checkpointing()
        self.denoising_unet.unet.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.reference_net.unet.disable_gradient_checkpointing()
        self.denoising_unet.unet.disable_gradient_checkpointing()

    # ------------------------------------------------------------------ forward

    def encode_reference(self, ref_latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """ReferenceNet features of clean reference latents ``(B, C, h, w)``: the bank the denoiser's self-attention
        reads as extra keys and values (independent of the denoising timestep)."""
        return self.reference_net(ref_latents)

    def encode_pose(self, pose: torch.Tensor, dtype: torch.dtype | None = None, chunk: int = 16) -> torch.Tensor:
        """``(B, F, C_pose, H, W)`` pose maps -> the pose encoder's residuals ``(B, F, C, h, w)``: timestep-independent,
        so a sampler computes them once per clip (as the release does) and passes ``pose_features`` to every step;
        ``chunk`` frames at a time, inputs cast to ``dtype`` (the latents') as :meth:`forward` casts them."""
        flat = pose.flatten(0, 1)
        flat = flat.to(dtype) if dtype is not None else flat
        out = torch.cat([self.pose_encoder(flat[i:i + chunk]) for i in range(0, flat.shape[0], chunk)])
        return out.unflatten(0, pose.shape[:2])

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, ref_latents: torch.Tensor,
                audio_feats: torch.Tensor | None = None, pose: torch.Tensor | None = None,
                audio_mask: torch.Tensor | None = None, audio_mode: str = "global",
                ref_keep: torch.Tensor | None = None, audio_keep: torch.Tensor | None = None,
                pose_keep: torch.Tensor | None = None, reference_bank: dict[str, torch.Tensor] | None = None,
                pose_features: torch.Tensor | None = None) -> torch.Tensor:
        """Predict for a batch of clips.

        Args:
            noisy_latents: ``(B, F, C, h, w)``.
            timesteps: ``(B,)`` (one timestep per clip) or a scalar.
            ref_latents: ``(B, C, h, w)`` clean reference latents.
            audio_feats: ``(B, F, K, D)``; may be ``None`` only with ``audio_mode="off"``.
            pose: ``(B, F, pose_channels, H, W)`` pose maps, ``H = h * latent_factor``; ``None``: no pose.
            audio_mask: ``(B, F, 1, H, W)`` region mask in ``[0, 1]`` at pixel resolution; used when ``"masked"``.
            audio_mode: ``"off"`` (audio attention muted, skipped), ``"masked"`` (Lips/Head Partial Attention,
                §3.2.2) or ``"global"``.
            ref_keep: ``(B,)`` bool; ``False`` hides the reference from that clip (attention mask).
            audio_keep: ``(B,)`` bool/float; 0 drops the audio of that clip: with ``audio_attention="direct"`` as
                the release does, zero audio tokens (``attn2`` then adds only its output bias x gain); with
                ``"projection"`` the audio attention's contribution is zeroed.
            pose_keep: ``(B,)`` bool/float; 0 zeroes the pose features of that clip.
            reference_bank: the output of :meth:`encode_reference` for ``ref_latents``, to reuse across sampling
                steps (the ReferenceNet sees the clean reference at t = 0, so its features do not change).
        Returns:
            ``(B, F, C, h, w)`` prediction (whatever the training objective defines: noise / v / x0).
        """
        if noisy_latents.ndim != 5:
            raise ValueError(f"noisy_latents must be (B, F, C, h, w), got shape {tuple(noisy_latents.shape)}")
        b, nf, c, h, w = noisy_latents.shape
        if c != self.latent_channels:
            raise ValueError(f"noisy_latents have {c} channels, the network expects {self.latent_channels}")
        if ref_latents.shape != (b, c, h, w):
            raise ValueError(f"ref_latents must be {(b, c, h, w)}, got {tuple(ref_latents.shape)}")
        if audio_mode not in AUDIO_MODES:
            raise ValueError(f"audio_mode must be one of {AUDIO_MODES}, got {audio_mode!r}")
        device, dtype = noisy_latents.device, noisy_latents.dtype
        timesteps = torch.as_tensor(timesteps, device=device)
        timesteps = timesteps.expand(b) if timesteps.ndim == 0 else timesteps
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps must have shape ({b},), got {tuple(timesteps.shape)}")
        ref_keep = _as_keep(ref_keep, b, "ref_keep", device)
        audio_keep = _as_keep(audio_keep, b, "audio_keep", device)
        pose_keep = _as_keep(pose_keep, b, "pose_keep", device)

        # ReferenceNet: once per clip, shared by its F frames (§3.1).
        bank = reference_bank if reference_bank is not None else self.encode_reference(ref_latents.to(dtype))

        # Pose Encoder: added after conv_in (§3.1).
        pose_residual = None
        if pose_features is not None:  # the pose encoder's output, computed once per clip (encode_pose)
            if pose_features.ndim != 5 or pose_features.shape[:2] != (b, nf):
                raise ValueError(f"pose_features must be ({b}, {nf}, C, h, w), got {tuple(pose_features.shape)}")
            pose_residual = pose_features.flatten(0, 1).to(dtype)
        elif pose is not None:
            hh, ww = h * self.latent_factor, w * self.latent_factor
            if pose.ndim != 5 or pose.shape[:2] != (b, nf) or pose.shape[-2:] != (hh, ww):
                raise ValueError(f"pose must be ({b}, {nf}, C, {hh}, {ww}), got {tuple(pose.shape)}")
            pose_residual = self.pose_encoder(pose.flatten(0, 1).to(dtype))
        if pose_residual is not None:
            if pose_keep is not None:
                pose_residual = pose_residual * pose_keep.to(dtype).repeat_interleave(nf)[:, None, None, None]

        # Audio Cross Attention context (§3.1) and Lips/Head Partial Attention regions (§3.2.2).
        region = None
        if audio_mode == "off":
            context = noisy_latents.new_zeros(b * nf, 1, self.denoising_unet.unet.config.cross_attention_dim)
        else:
            if audio_feats is None or audio_feats.shape[:2] != (b, nf):
                got = None if audio_feats is None else tuple(audio_feats.shape)
                raise ValueError(f"audio_mode={audio_mode!r} needs audio_feats of shape ({b}, {nf}, K, D), got {got}")
            if self.audio_projection is not None:
                context = self.audio_projection(audio_feats.to(dtype))
            else:  # as released: the audio tokens are attn2's keys/values
                d = self.config["audio_dim"]
                if audio_feats.ndim != 4 or audio_feats.shape[-1] != d:
                    raise ValueError(f"audio_feats must be ({b}, {nf}, K, {d}), got {tuple(audio_feats.shape)}")
                context = audio_feats.flatten(0, 1).to(dtype)
                if audio_keep is not None:
                    # The release drops audio by feeding zero audio tokens (its CFG branch: torch.zeros_like of the
                    # features), which still leaves attn2's output bias (x gain); so does a dropped clip here.
                    context = context * audio_keep.to(dtype).repeat_interleave(nf)[:, None, None]
                    audio_keep = None
            if audio_mode == "masked":
                if audio_mask is None or audio_mask.shape[:3] != (b, nf, 1):
                    got = None if audio_mask is None else tuple(audio_mask.shape)
                    raise ValueError(f"audio_mode='masked' needs audio_mask of shape ({b}, {nf}, 1, H, W), got {got}")
                region = region_tokens_by_length(audio_mask.to(device),
                                                 token_grids(h, w, self.denoising_unet.num_levels))

        ctx = AttentionContext(num_frames=nf, reference_bank=bank, reference_keep=ref_keep, audio_mode=audio_mode,
                               audio_keep=audio_keep, audio_region=region)
        out = self.denoising_unet(noisy_latents.flatten(0, 1), timesteps.repeat_interleave(nf), context, ctx,
                                  pose_residual=pose_residual)
        return out.view(b, nf, *out.shape[1:])
