"""Denoising U-Net of EchoMimicV2 (paper §3.1, Figure 2), laid out as the released ``EMOUNet3DConditionModel``.

- ``attn1`` of every spatial transformer block reads the ReferenceNet's bank (reference attention);
- ``attn2`` is the Audio Cross Attention (the text cross-attention repurposed for audio) with Lips/Head Partial
  Attention (§3.2.2, §3.3). As released, its keys/values come straight from the audio features (``to_k`` / ``to_v``
  take ``cross_attention_dim = 384``, whisper-tiny's width) and its output is multiplied by a gain (3.0) before the
  residual add;
- the Pose Encoder's features are added to the output of ``conv_in`` (the release's ``face_musk_fea``);
- a motion module follows every layer of every block (21 in the SD1.5 layout), see :mod:`.temporal_module`.

The pretrained UNet is loaded first and modified in place (processors, forward hooks, ``motion_modules`` lists), so
every parameter keeps its diffusers / release name: ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.…``,
``down_blocks.0.motion_modules.0.temporal_transformer.…``, ``conv_in.weight``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from .attention_processors import AttentionContext, AudioCrossAttnProcessor, ReferenceReadAttnProcessor
from .reference_net import check_sd_style_unet, transformer_block_keys
from .temporal_module import FrameCount, MotionModule


class _PoseResidual:
    """Adds the pose features to ``conv_in``'s output (a forward hook); set and cleared around each forward."""

    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None

    def __call__(self, conv: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self.residual is None:
            return output
        if self.residual.shape != output.shape:
            raise ValueError(f"pose features {tuple(self.residual.shape)} do not match conv_in output "
                             f"{tuple(output.shape)}: check latent_factor and the pose map size")
        return output + self.residual.to(output.dtype)


def motion_module_hosts(unet: UNet2DConditionModel) -> list[tuple[nn.Module, list[nn.Module]]]:
    """``(block, host layers)`` for every UNet block, in the release's order: the spatial transformers of a block
    with attention, else its resnets; for the mid block its transformer(s)."""
    out = []
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        attentions = getattr(block, "attentions", None)
        out.append((block, list(attentions) if attentions else list(block.resnets)))
    return out


def _host_channels(host: nn.Module) -> int:
    if hasattr(host, "out_channels") and isinstance(host.out_channels, int):
        return host.out_channels  # ResnetBlock2D
    return host.config.in_channels  # Transformer2DModel (output = input channels)


class DenoisingUNet(nn.Module):
    """``(B * F, C, h, w)`` noisy latents -> ``(B * F, C, h, w)`` prediction, frame-major per sample.

    Args:
        unet: an SD-style ``UNet2DConditionModel`` (fresh or pretrained), modified in place and kept as ``self.unet``.
            Its ``cross_attention_dim`` is the width of the audio context (the audio features' ``D`` as released, or
            the projection's output with ``audio_attention: projection``).
        temporal: insert motion modules (``False``: an image model, e.g. for single-frame stages).
        temporal_num_attention_heads: heads of each temporal attention (released: 8).
        temporal_num_layers: temporal transformer blocks per motion module (released: 1).
        temporal_num_attentions: temporal self-attentions per block (released: 2).
        temporal_max_frames: frames covered by the frame-position table (released: 32).
        temporal_norm_num_groups: groups of the motion modules' input GroupNorm (released: 32).
        audio_gain: factor on the audio cross-attention output (released: 3.0, ``audio_feature_ratio``).
    """

    def __init__(self, unet: UNet2DConditionModel, temporal: bool = True, temporal_num_attention_heads: int = 8,
                 temporal_num_layers: int = 1, temporal_num_attentions: int = 2, temporal_max_frames: int = 32,
                 temporal_norm_num_groups: int = 32, audio_gain: float = 1.0):
        super().__init__()
        check_sd_style_unet(unet, "DenoisingUNet")
        self.block_keys = transformer_block_keys(unet)
        modules = dict(unet.named_modules())
        for key in self.block_keys:
            modules[key].attn1.set_processor(ReferenceReadAttnProcessor(key))
            modules[key].attn2.set_processor(AudioCrossAttnProcessor(gain=audio_gain))
        self._pose = _PoseResidual()
        unet.conv_in.register_forward_hook(self._pose)
        self._frames = FrameCount()
        if temporal:
            for block, hosts in motion_module_hosts(unet):
                block.motion_modules = nn.ModuleList([
                    MotionModule(_host_channels(h), self._frames, num_attention_heads=temporal_num_attention_heads,
                                 num_layers=temporal_num_layers, num_attentions=temporal_num_attentions,
                                 max_frames=temporal_max_frames, norm_num_groups=temporal_norm_num_groups)
                    for h in hosts])
                for host, motion in zip(hosts, block.motion_modules):
                    host.register_forward_hook(motion.after_host)
        self.unet = unet
        self.num_levels = len(unet.config.block_out_channels)

    def transformer_blocks(self) -> list[BasicTransformerBlock]:
        """The spatial transformer blocks (their ``attn2`` is the audio cross-attention)."""
        return [m for m in self.unet.modules() if isinstance(m, BasicTransformerBlock)]

    def audio_attention_modules(self) -> list[nn.Module]:
        """``norm2`` + ``attn2`` of every spatial block: the Audio Cross Attention layers."""
        out: list[nn.Module] = []
        for blk in self.transformer_blocks():
            out += [blk.norm2, blk.attn2]
        return out

    def temporal_modules(self) -> list[MotionModule]:
        return [m for m in self.unet.modules() if isinstance(m, MotionModule)]

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                attn_context: AttentionContext, pose_residual: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            sample: ``(B * F, C, h, w)`` noisy latents.
            timesteps: ``(B * F,)``.
            encoder_hidden_states: ``(B * F, K', cross_attention_dim)`` audio context tokens.
            attn_context: per-forward state (reference bank, audio mode/mask/keep, ``num_frames``).
            pose_residual: ``(B * F, block_out_channels[0], h, w)`` pose features, added after ``conv_in``.
        Returns:
            ``(B * F, C, h, w)``.
        """
        self._frames.num_frames = attn_context.num_frames
        self._pose.residual = pose_residual
        try:
            return self.unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states,
                             cross_attention_kwargs={"attn_context": attn_context}, return_dict=False)[0]
        finally:
            self._pose.residual = None
