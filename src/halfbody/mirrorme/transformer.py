"""MirrorMe's denoiser (Figure 2): the LTX-Video transformer with reference latents, audio fusion and a hand guider.

The diffusers :class:`LTXVideoTransformer3DModel` is kept whole (so LTX-Video 2B loads unchanged); this module runs
its parts in our own block loop, which adds what MirrorMe adds:

* **Reference identity (§3.2).** The reference image's VAE latent tokens are concatenated with the noisy video
  tokens in the self-attention sequence. Their RoPE coordinates are the video's spatial grid with a large temporal
  offset (:func:`token_coordinates`), and their per-token timestep is 0 (clean), as is that of motion frames
  (:func:`token_timesteps`); neither is ever part of the loss.
* **Audio fusion (§3.3).** ``a_glo`` of the :class:`CausalAudioEncoder` is added to the video tokens of its latent
  frame; an :class:`AudioAdapter` after every ``adapter_every`` blocks lets each latent frame's tokens attend to that
  frame's ``a_loc`` tokens. With a face mask (the half-body phase, §3.4) both act inside the face only: ``a_glo`` is
  added to face tokens, and the adapter's other queries see only its padding token.
  ``audio_fusion="cross_attention"`` builds Table 1's baseline instead: the raw audio features, one shared linear
  projection, plain cross-attention; no causal encoder.
* **Hand guider (§3.4).** :class:`HandPoseEncoder` features are added to the video tokens.

Text conditioning is not used. Every block's text cross-attention (``attn2``) still needs keys: it gets
``null_caption_tokens`` learnable tokens of the caption width (zero-initialised, so at the start every block's
``attn2`` adds one constant vector), projected by LTX's own ``caption_projection``.

RoPE scale. LTX normalises coordinates before its frequencies: time ``/ 20``, height and width ``/ 2048``
(``LTXVideoRotaryPosEmbed``), and the slowest frequency turns by ``pi * g`` over a normalised span ``g``, so it
wraps after ``g = 2``: 40 s of time. Video tokens sit at ``t = (first pixel frame of their latent frame) / fps``
seconds (the LTX condition pipeline's convention); the reference sits at ``reference_time_offset`` seconds. The
offset must exceed the clip's last token time (else it lands among the video frames) and stay below 40 s (else it
aliases onto early frames at the slowest frequency). The default 20 s is 4x a 121-frame clip at 25 fps.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from halfbody.mirrorme.audio_adapter import AudioAdapter
from halfbody.mirrorme.causal_audio_encoder import CausalAudioEncoder
from halfbody.mirrorme.hand_pose_encoder import HandPoseEncoder
from halfbody.models.pretrained import load_pretrained

__all__ = ["MirrorMeTransformer", "token_coordinates", "token_timesteps", "tiny_ltx_config", "AUDIO_FUSIONS"]

AUDIO_FUSIONS = ("adapter", "cross_attention")
ROPE_BASE_SECONDS = 20.0  # LTXVideoRotaryPosEmbed(base_num_frames=20): time coordinates are divided by it
ROPE_WRAP_SECONDS = 2 * ROPE_BASE_SECONDS  # the slowest RoPE frequency wraps after a normalised span of 2
_LTX_EXPECTED = ("a diffusers LTXVideoTransformer3DModel directory (config.json + diffusion_pytorch_model*.safetensors),"
                 " e.g. the transformer/ folder of Lightricks/LTX-Video (2B) in diffusers layout")


def tiny_ltx_config(latent_channels: int, num_layers: int = 4, heads: int = 2, head_dim: int = 32,
                    caption_channels: int = 32) -> dict[str, Any]:
    """A small ``LTXVideoTransformer3DModel`` config (random weights, CPU presets and tests)."""
    return dict(in_channels=latent_channels, out_channels=latent_channels, patch_size=1, patch_size_t=1,
                num_attention_heads=heads, attention_head_dim=head_dim, cross_attention_dim=heads * head_dim,
                num_layers=num_layers, caption_channels=caption_channels)


def token_coordinates(batch: int, latent_frames: int, height: int, width: int, *, fps: float, spatial_factor: int,
                      temporal_factor: int, reference_time_offset: float | None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE coordinates ``(B, 3, N)`` in (seconds, pixel y, pixel x) of [reference tokens,] video tokens.

    Tokens are ordered (frame, row, column). The reference (when ``reference_time_offset`` is not None) comes first:
    the video's spatial grid at time ``reference_time_offset``.
    """
    grid_y = torch.arange(height, dtype=torch.float32, device=device) * spatial_factor
    grid_x = torch.arange(width, dtype=torch.float32, device=device) * spatial_factor
    first_pixel_frame = (torch.arange(latent_frames, dtype=torch.float32, device=device) * temporal_factor
                         + 1 - temporal_factor).clamp_min(0)
    seconds = first_pixel_frame / float(fps)
    t, y, x = torch.meshgrid(seconds, grid_y, grid_x, indexing="ij")
    coords = torch.stack([t.flatten(), y.flatten(), x.flatten()])  # (3, F'*h*w)
    if reference_time_offset is not None:
        last = max(0, (latent_frames - 1) * temporal_factor + 1 - temporal_factor) / float(fps)  # on the host: no sync
        if not last < reference_time_offset < ROPE_WRAP_SECONDS:
            raise ValueError(f"model.network.reference_time_offset={reference_time_offset} s must lie between the "
                             f"clip's last latent frame ({last:.2f} s) and {ROPE_WRAP_SECONDS:.0f} s, where LTX's "
                             "slowest RoPE frequency wraps")
        ry, rx = torch.meshgrid(grid_y, grid_x, indexing="ij")
        ref = torch.stack([torch.full_like(ry.flatten(), float(reference_time_offset)), ry.flatten(), rx.flatten()])
        coords = torch.cat([ref, coords], dim=1)
    return coords.unsqueeze(0).expand(batch, -1, -1)


def token_timesteps(t: torch.Tensor, *, num_reference_tokens: int, latent_frames: int, tokens_per_frame: int,
                    clean_latent_frames: int = 0) -> torch.Tensor:
    """Per-token timesteps ``(B, N)``: 0 for reference tokens and the first ``clean_latent_frames`` (motion frames),
    ``t`` for every other video token. ``t`` is ``(B,)`` in ``[0, 1]``."""
    b = t.shape[0]
    per_frame = t[:, None].expand(b, latent_frames).clone()
    if clean_latent_frames:
        per_frame[:, :clean_latent_frames] = 0.0
    video = per_frame[:, :, None].expand(b, latent_frames, tokens_per_frame).flatten(1)
    return torch.cat([video.new_zeros(b, num_reference_tokens), video], dim=1)


class _NullCaption(nn.Module):
    """Learnable stand-in for LTX's text tokens (zero-initialised)."""

    def __init__(self, num_tokens: int, channels: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(num_tokens, channels))

    def forward(self, batch: int) -> torch.Tensor:
        return self.tokens.unsqueeze(0).expand(batch, -1, -1)


def _keep(keep: torch.Tensor | None, b: int, name: str, like: torch.Tensor) -> torch.Tensor | None:
    if keep is None:
        return None
    keep = torch.as_tensor(keep, device=like.device)
    if keep.shape != (b,):
        raise ValueError(f"{name} must have shape ({b},), got {tuple(keep.shape)}")
    return keep.to(like.dtype)


class MirrorMeTransformer(nn.Module):
    """The DiT denoiser: ``(noisy video latents, t, reference latent, audio, hand pose) -> velocity``.

    Args:
        transformer: the diffusers ``LTXVideoTransformer3DModel`` (``in_channels`` = the VAE's latent channels).
        audio_feature_dim: ``K * D`` of the per-frame audio features (the audio encoder's windows).
        spatial_factor / temporal_factor: the video autoencoder's compression (LTX: 32 / 8).
        audio_fusion: ``"adapter"`` (causal audio encoder + adapter, §3.3) or ``"cross_attention"`` (Table 1 baseline).
        adapter_every: ``k``: an adapter after every ``k`` blocks (the paper does not give ``k``).
        audio_dim / audio_tokens: ``C_a`` and ``n`` of ``a_loc``.
        audio_encoder_channels: width of the causal convolution stack.
        adapter_heads / adapter_head_dim: adapter attention shape.
        hand_pose: build the hand guider.
        pose_channels: per-frame width of the hand guider at the latent grid.
        pose_block_out_channels: the per-frame pose encoder's stage widths (``None``: its defaults).
        reference_time_offset: the reference tokens' RoPE time, seconds (see the module docstring).
        null_caption_tokens: tokens fed to the text cross-attention.
        gradient_checkpointing: recompute each block in the backward pass.
    """

    def __init__(self, transformer: nn.Module, audio_feature_dim: int, *, spatial_factor: int, temporal_factor: int,
                 audio_fusion: str = "adapter", adapter_every: int = 4, audio_dim: int = 768, audio_tokens: int = 16,
                 audio_encoder_channels: int = 512, adapter_heads: int = 8, adapter_head_dim: int = 64,
                 hand_pose: bool = True, pose_channels: int = 32,
                 pose_block_out_channels: tuple[int, ...] | list[int] | None = None,
                 reference_time_offset: float = 20.0, null_caption_tokens: int = 1,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if audio_fusion not in AUDIO_FUSIONS:
            raise ValueError(f"model.network.audio_fusion={audio_fusion!r}: expected one of {list(AUDIO_FUSIONS)}")
        cfg = transformer.config
        if cfg.patch_size != 1 or cfg.patch_size_t != 1:
            raise ValueError("MirrorMeTransformer expects an LTX transformer with patch_size = patch_size_t = 1 "
                             f"(got {cfg.patch_size}, {cfg.patch_size_t})")
        if not 0 < adapter_every <= cfg.num_layers:
            raise ValueError(f"model.network.adapter_every={adapter_every} must be in [1, {cfg.num_layers}] "
                             f"(the transformer's num_layers)")
        self.transformer = transformer
        self.latent_channels = int(cfg.in_channels)
        self.model_dim = int(cfg.num_attention_heads * cfg.attention_head_dim)
        self.spatial_factor, self.temporal_factor = int(spatial_factor), int(temporal_factor)
        self.audio_fusion = audio_fusion
        self.adapter_every = int(adapter_every)
        self.reference_time_offset = float(reference_time_offset)
        self.gradient_checkpointing = gradient_checkpointing
        self.null_caption = _NullCaption(null_caption_tokens, int(cfg.caption_channels))
        n_adapters = cfg.num_layers // self.adapter_every
        if audio_fusion == "adapter":
            self.audio_encoder = CausalAudioEncoder(audio_feature_dim, self.model_dim, audio_dim, audio_tokens,
                                                    temporal_factor, audio_encoder_channels)
            adapter_kwargs = dict(audio_dim=audio_dim, padding_token=True, output_norm=True)
        else:  # Table 1 baseline: raw audio features, one shared linear projection, plain cross-attention
            self.audio_encoder = nn.Linear(audio_feature_dim, audio_dim)
            adapter_kwargs = dict(audio_dim=audio_dim, padding_token=False, output_norm=False)
        self.audio_adapters = nn.ModuleList(
            AudioAdapter(self.model_dim, heads=adapter_heads, head_dim=adapter_head_dim, **adapter_kwargs)
            for _ in range(n_adapters))
        self.hand_pose_encoder = (HandPoseEncoder(self.model_dim, spatial_factor, temporal_factor, pose_channels,
                                                  pose_block_out_channels) if hand_pose else None)

    # ------------------------------------------------------------------------------------------ builders
    @classmethod
    def tiny(cls, latent_channels: int, audio_feature_dim: int, *, spatial_factor: int, temporal_factor: int,
             transformer_config: dict[str, Any] | None = None, seed: int = 0, **kwargs: Any) -> "MirrorMeTransformer":
        """Random weights, small LTX config (``tiny_ltx_config`` overridden by ``transformer_config``)."""
        from diffusers import LTXVideoTransformer3DModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            config = {**tiny_ltx_config(latent_channels), **(transformer_config or {})}
            # LTX projects captions to the hidden size, which its text cross-attention then reads
            config["cross_attention_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
            transformer = LTXVideoTransformer3DModel(**config)
            kwargs.setdefault("audio_dim", 64)
            kwargs.setdefault("audio_tokens", 4)
            kwargs.setdefault("audio_encoder_channels", 64)
            kwargs.setdefault("adapter_heads", 2)
            kwargs.setdefault("adapter_head_dim", 32)
            kwargs.setdefault("adapter_every", 2)
            kwargs.setdefault("pose_channels", 8)
            kwargs.setdefault("pose_block_out_channels", (8,) * (int(spatial_factor).bit_length()))
            return cls(transformer, audio_feature_dim, spatial_factor=spatial_factor, temporal_factor=temporal_factor,
                       **kwargs)

    @classmethod
    def from_pretrained_parts(cls, transformer_dir: str | os.PathLike | None, latent_channels: int,
                              audio_feature_dim: int, *, spatial_factor: int, temporal_factor: int,
                              key_prefix: str = "model.network", dtype: torch.dtype | None = None,
                              **kwargs: Any) -> "MirrorMeTransformer":
        """LTX-Video's transformer from a local diffusers directory (``{key_prefix}.transformer_dir``), new parts random."""
        from diffusers import LTXVideoTransformer3DModel

        extra = {} if dtype is None else {"torch_dtype": dtype}
        transformer = load_pretrained(LTXVideoTransformer3DModel, transformer_dir, f"{key_prefix}.transformer_dir",
                                      _LTX_EXPECTED, **extra)
        if transformer.config.in_channels != latent_channels:
            raise ValueError(f"{key_prefix}.transformer_dir: in_channels={transformer.config.in_channels} does not "
                             f"match the autoencoder's latent_channels={latent_channels}")
        return cls(transformer, audio_feature_dim, spatial_factor=spatial_factor, temporal_factor=temporal_factor,
                   **kwargs)

    # ------------------------------------------------------------------------------------------ groups
    def module_groups(self) -> dict[str, list[nn.Module]]:
        """Disjoint groups covering every parameter: ``transformer`` (LTX + the null caption), ``audio_encoder``
        (the causal audio encoder; the baseline's raw-feature projection), ``audio_adapter``, ``pose_encoder``
        (hand guider)."""
        return {
            "transformer": [self.transformer, self.null_caption],
            "audio_encoder": [self.audio_encoder],
            "audio_adapter": [self.audio_adapters],
            "pose_encoder": [self.hand_pose_encoder] if self.hand_pose_encoder is not None else [],
        }

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, ref_latents: torch.Tensor,
                audio_feats: torch.Tensor | None, pose: torch.Tensor | None = None, *, fps: float,
                face_mask: torch.Tensor | None = None, clean_latent_frames: int = 0,
                ref_keep: torch.Tensor | None = None, audio_keep: torch.Tensor | None = None,
                pose_keep: torch.Tensor | None = None, conditions: dict[str, torch.Tensor | None] | None = None,
                return_token_timesteps: bool = False):
        """Predict the velocity of every video latent.

        Args:
            noisy_latents: ``(B, F', C, h, w)``; the first ``clean_latent_frames`` are clean motion frames.
            timesteps: ``(B,)`` float in ``[0, 1]`` (``t = 1`` is noise).
            ref_latents: ``(B, C, h, w)`` the clean reference latent.
            audio_feats: ``(B, F, K, D)`` per-video-frame audio features, ``F = 1 + (F' - 1) tf``; None: no audio.
            pose: ``(B, F, 3, h s, w s)`` hand-keypoint maps; None: no hand guidance.
            fps: frame rate (RoPE time coordinates).
            face_mask: ``(B, F', h, w)`` latent-resolution face mask gating audio attention; None: no gating.
            clean_latent_frames: leading latent frames that are clean motion frames (timestep 0).
            ref_keep / audio_keep / pose_keep: ``(B,)``; 0 zeroes that condition for that clip (CFG dropout).
            conditions: :meth:`encode_conditions` of ``audio_feats`` / ``pose`` computed once for every sampling step
                (they do not depend on ``x_t`` or ``t``); ``audio_feats`` and ``pose`` are then ignored.
            return_token_timesteps: also return the ``(B, N)`` per-token timesteps fed to LTX (tests).
        Returns:
            ``(B, F', C, h, w)`` velocity (and the per-token timesteps when asked).
        """
        if noisy_latents.ndim != 5:
            raise ValueError(f"noisy_latents must be (B, F', C, h, w), got shape {tuple(noisy_latents.shape)}")
        b, fl, c, h, w = noisy_latents.shape
        if c != self.latent_channels:
            raise ValueError(f"noisy_latents have {c} channels, the transformer expects {self.latent_channels}")
        if ref_latents.shape != (b, c, h, w):
            raise ValueError(f"ref_latents must be {(b, c, h, w)}, got {tuple(ref_latents.shape)}")
        if not 0 <= clean_latent_frames < fl:
            raise ValueError(f"clean_latent_frames={clean_latent_frames} must leave at least one of {fl} latent "
                             "frames to denoise")
        tr = self.transformer
        ref_keep = _keep(ref_keep, b, "ref_keep", noisy_latents)
        audio_keep = _keep(audio_keep, b, "audio_keep", noisy_latents)
        hw = h * w

        # §3.2: reference tokens first, then video tokens in (frame, row, column) order
        ref = ref_latents if ref_keep is None else ref_latents * ref_keep.view(b, 1, 1, 1)
        ref_tokens = ref.flatten(2).transpose(1, 2)  # (B, hw, C)
        video_tokens = noisy_latents.permute(0, 1, 3, 4, 2).reshape(b, fl * hw, c)
        hidden = tr.proj_in(torch.cat([ref_tokens, video_tokens], dim=1))  # (B, N, D)
        ref_h, vid_h = hidden[:, :hw], hidden[:, hw:]

        if face_mask is not None and face_mask.shape != (b, fl, h, w):
            raise ValueError(f"face_mask must be {(b, fl, h, w)}, got {tuple(face_mask.shape)}")
        # §3.3: a_glo added per latent frame (inside the face mask when one is given); §3.4: hand guider per token
        if conditions is None:
            conditions = self.encode_conditions(audio_feats, pose, audio_keep=audio_keep, pose_keep=pose_keep)
        a_loc = conditions["a_loc"]
        if conditions["a_glo"] is not None:
            if conditions["a_glo"].shape[1] != fl:
                raise ValueError(f"audio features cover {conditions['a_glo'].shape[1]} latent frames, the video has {fl}")
            a_glo = conditions["a_glo"].repeat_interleave(hw, dim=1)  # (B, F'*hw, D)
            if face_mask is not None:  # §3.4: audio acts inside the face only
                a_glo = a_glo * face_mask.reshape(b, fl * hw, 1).to(a_glo.dtype)
            vid_h = vid_h + a_glo
        if conditions["pose"] is not None:
            if conditions["pose"].shape[1:4] != (fl, h, w):
                raise ValueError(f"pose maps give a {tuple(conditions['pose'].shape[1:4])} latent grid, the video is "
                                 f"{(fl, h, w)}")
            vid_h = vid_h + conditions["pose"].flatten(1, 3)
        hidden = torch.cat([ref_h, vid_h], dim=1)

        t_tokens = token_timesteps(timesteps.float(), num_reference_tokens=hw, latent_frames=fl,
                                   tokens_per_frame=hw, clean_latent_frames=clean_latent_frames)
        temb, embedded = tr.time_embed((t_tokens * 1000.0).flatten(), batch_size=b, hidden_dtype=hidden.dtype)
        temb = temb.view(b, -1, temb.shape[-1])
        embedded = embedded.view(b, -1, embedded.shape[-1])
        coords = token_coordinates(b, fl, h, w, fps=fps, spatial_factor=self.spatial_factor,
                                   temporal_factor=self.temporal_factor,
                                   reference_time_offset=self.reference_time_offset, device=hidden.device)
        rope = tr.rope(hidden, video_coords=coords)
        caption = tr.caption_projection(self.null_caption(b).to(hidden.dtype))

        for i, block in enumerate(tr.transformer_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(block, hidden, caption, temb, rope, None, use_reentrant=False)
            else:
                hidden = block(hidden_states=hidden, encoder_hidden_states=caption, temb=temb, image_rotary_emb=rope)
            if (i + 1) % self.adapter_every == 0 and a_loc is not None:
                hidden = self._adapt(self.audio_adapters[(i + 1) // self.adapter_every - 1], hidden, a_loc, face_mask,
                                     audio_keep, b, fl, hw)

        shift, scale = (tr.scale_shift_table[None, None] + embedded[:, :, None]).unbind(dim=2)
        out = tr.proj_out(tr.norm_out(hidden) * (1 + scale) + shift)[:, hw:]  # video tokens only
        velocity = out.reshape(b, fl, h, w, c).permute(0, 1, 4, 2, 3)
        return (velocity, t_tokens) if return_token_timesteps else velocity

    def encode_conditions(self, audio_feats: torch.Tensor | None, pose: torch.Tensor | None,
                          audio_keep: torch.Tensor | None = None, pose_keep: torch.Tensor | None = None
                          ) -> dict[str, torch.Tensor | None]:
        """The timestep-independent condition features: ``a_glo (B, F', D)``, ``a_loc`` (``(B, F', n, C_a)``, or
        ``(B, 1, F, K*D)`` raw tokens for the baseline) and hand-guider ``pose`` features ``(B, F', h, w, D)``; each
        None when its input is, with the keep masks applied."""
        out: dict[str, torch.Tensor | None] = {"a_glo": None, "a_loc": None, "pose": None}
        dtype = self.transformer.proj_in.weight.dtype
        if audio_feats is not None:
            b = audio_feats.shape[0]
            if self.audio_fusion == "adapter":
                a_glo, out["a_loc"] = self.audio_encoder(audio_feats.to(dtype))
                keep = _keep(audio_keep, b, "audio_keep", a_glo)
                out["a_glo"] = a_glo if keep is None else a_glo * keep.view(b, 1, 1)
            else:  # baseline: one projected raw feature token per video frame of the clip
                out["a_loc"] = self.audio_encoder(audio_feats.to(dtype).flatten(2)).unsqueeze(1)  # (B, 1, F, C_a)
        if pose is not None and self.hand_pose_encoder is not None:
            if self.gradient_checkpointing and torch.is_grad_enabled():  # full-resolution convs over every frame
                p = checkpoint(self.hand_pose_encoder, pose.to(dtype), use_reentrant=False)
            else:
                p = self.hand_pose_encoder(pose.to(dtype))
            keep = _keep(pose_keep, p.shape[0], "pose_keep", p)
            out["pose"] = p if keep is None else p * keep.view(-1, 1, 1, 1, 1)
        return out

    def _adapt(self, adapter: AudioAdapter, hidden: torch.Tensor, a_loc: torch.Tensor, face_mask: torch.Tensor | None,
               audio_keep: torch.Tensor | None, b: int, fl: int, hw: int) -> torch.Tensor:
        """Eq. 5-7 on the video tokens: per latent frame (time into batch), or per clip for the baseline."""
        video = hidden[:, hw:]
        groups = fl if a_loc.shape[1] == fl else 1
        mask = None if face_mask is None else face_mask.reshape(b, groups, -1)
        update = adapter(video.reshape(b, groups, -1, video.shape[-1]), a_loc, mask, audio_keep)
        return torch.cat([hidden[:, :hw], video + update.reshape(b, fl * hw, -1)], dim=1)
