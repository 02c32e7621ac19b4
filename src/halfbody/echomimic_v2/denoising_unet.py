"""Denoising U-Net of EchoMimicV2 (paper §3.1, Figure 2): the SD1.5 UNet plus EchoMimicV2's changes.

- ``attn1`` of every spatial transformer block reads the ReferenceNet's bank (reference attention);
- ``attn2`` is the Audio Cross Attention (the text cross-attention repurposed for audio) with Lips/Head Partial
  Attention (§3.2.2, §3.3);
- ``conv_in`` is wrapped to add the Pose Encoder's features (§3.1 "keypoint maps ... serving as pose condition");
- every spatial ``Transformer2DModel`` (down, mid, up) is followed by a temporal module (§3.4).

The pretrained UNet is loaded first and modified in place, so its weights load by their diffusers names.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from .attention_processors import AttentionContext, AudioCrossAttnProcessor, ReferenceReadAttnProcessor
from .pose_encoder import PoseConditionedConvIn
from .reference_net import check_sd_style_unet, transformer_block_keys
from .temporal_module import SpatialTemporalTransformer, TemporalTransformer


class DenoisingUNet(nn.Module):
    """``(B * F, C, h, w)`` noisy latents -> ``(B * F, C, h, w)`` prediction, frame-major per sample.

    Args:
        unet: an SD-style ``UNet2DConditionModel`` (fresh or pretrained), modified in place and kept as ``self.unet``.
        temporal: insert temporal modules (``False``: an image model, e.g. for single-frame stages).
        temporal_num_attention_heads: heads of each temporal attention.
        temporal_num_layers: temporal transformer blocks per temporal module.
        temporal_num_attentions: temporal self-attentions per temporal block (AnimateDiff: 2).
    """

    def __init__(self, unet: UNet2DConditionModel, temporal: bool = True, temporal_num_attention_heads: int = 8,
                 temporal_num_layers: int = 1, temporal_num_attentions: int = 2):
        super().__init__()
        check_sd_style_unet(unet, "DenoisingUNet")
        self.block_keys = transformer_block_keys(unet)
        modules = dict(unet.named_modules())
        for key in self.block_keys:
            modules[key].attn1.set_processor(ReferenceReadAttnProcessor(key))
            modules[key].attn2.set_processor(AudioCrossAttnProcessor())
        unet.conv_in = PoseConditionedConvIn(unet.conv_in)
        # Every spatial transformer (down, mid, up) gets a wrapper; with ``temporal`` also a temporal module (§3.4).
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            for i, spatial in enumerate(getattr(block, "attentions", None) or []):
                motion = TemporalTransformer(
                    spatial.config.in_channels, num_attention_heads=temporal_num_attention_heads,
                    num_layers=temporal_num_layers, num_attentions=temporal_num_attentions,
                    norm_num_groups=unet.config.norm_num_groups) if temporal else None
                block.attentions[i] = SpatialTemporalTransformer(spatial, motion)
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

    def temporal_modules(self) -> list[TemporalTransformer]:
        return [m for m in self.unet.modules() if isinstance(m, TemporalTransformer)]

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
        conv_in: PoseConditionedConvIn = self.unet.conv_in
        conv_in._residual = pose_residual
        try:
            return self.unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states,
                             cross_attention_kwargs={"attn_context": attn_context}, return_dict=False)[0]
        finally:
            conv_in._residual = None
