"""ReferenceNet of EchoMimicV2 (paper §3.1 "ReferenceNet-based Backbone", Figure 2).

A copy of the SD1.5 UNet runs once per sample on the clean reference latent (timestep 0). The input of every
self-attention (``attn1``) is written to a reference bank, keyed by the transformer block's name; the denoising
UNet reads the bank in its own self-attentions (:mod:`.attention_processors`). The ReferenceNet has no text, so its
cross-attention (``attn2``) attends to a learned null context.

What can never reach the bank is removed at construction, so the ReferenceNet has no unused parameters (DDP with
``find_unused_parameters=False`` works) and skips that compute: everything of the last transformer block of the last
up block after its ``norm1``, that transformer's ``proj_out``, and ``conv_norm_out`` / ``conv_out``.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from .attention_processors import AttentionContext, PlainAttnProcessor, ReferenceWriteAttnProcessor


def transformer_block_keys(unet: nn.Module) -> list[str]:
    """Names of the UNet's spatial ``BasicTransformerBlock`` s (module registration order): the bank's keys.

    Call on a plain ``UNet2DConditionModel`` (before wrapping), so ReferenceNet and denoiser keys agree.
    """
    return [name for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


def check_sd_style_unet(unet: UNet2DConditionModel, what: str) -> None:
    """One-line errors for UNets the EchoMimicV2 processors do not support."""
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    if not blocks:
        raise ValueError(f"{what}: the UNet has no cross-attention blocks (use CrossAttn*Block2D block types)")
    for blk in blocks:
        if blk.norm_type != "layer_norm" or blk.only_cross_attention or blk.attn2 is None or blk.pos_embed is not None:
            raise ValueError(f"{what}: only SD-style transformer blocks (layer_norm, self+cross attention) are supported")
    if type(unet.up_blocks[-1]).__name__ != "CrossAttnUpBlock2D":
        raise ValueError(f"{what}: the last up block must be CrossAttnUpBlock2D (SD1.5 layout)")


class _BankWriteOnlyBlock(nn.Module):
    """Stand-in for the ReferenceNet's very last transformer block: only its ``norm1`` output matters (bank write).

    Keeps the call signature of ``BasicTransformerBlock`` (diffusers' checkpointing passes arguments positionally)
    and the parameter name ``norm1``. Returns ``hidden_states`` unchanged: nothing downstream is used.
    """

    def __init__(self, norm1: nn.Module, key: str):
        super().__init__()
        self.norm1 = norm1
        self.key = key

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        ctx = (cross_attention_kwargs or {}).get("attn_context")
        if ctx is None:
            raise ValueError(f"ReferenceNet block {self.key!r} ran without an attn_context (call ReferenceNet.forward)")
        ctx.reference_bank.setdefault(self.key, self.norm1(hidden_states))
        return hidden_states


class ReferenceNet(nn.Module):
    """Reference feature extractor: ``(B, C, h, w)`` clean reference latent -> reference bank.

    Args:
        unet: an SD-style ``UNet2DConditionModel`` (fresh or pretrained); it is modified in place (processors set,
            tail removed) and kept as ``self.unet``.
        null_context_tokens: tokens of the learned null context for ``attn2`` (initialised to zeros).
    """

    def __init__(self, unet: UNet2DConditionModel, null_context_tokens: int = 1):
        super().__init__()
        check_sd_style_unet(unet, "ReferenceNet")
        self.bank_keys = transformer_block_keys(unet)
        modules = dict(unet.named_modules())
        for key in self.bank_keys:
            blk = modules[key]
            blk.attn1.set_processor(ReferenceWriteAttnProcessor(key))
            blk.attn2.set_processor(PlainAttnProcessor())

        # Remove the tail that can never reach the bank (see module docstring).
        last_transformer = unet.up_blocks[-1].attentions[-1]
        if last_transformer.inner_dim != last_transformer.in_channels:
            raise ValueError("ReferenceNet: transformer inner_dim must equal its in_channels (SD1.5 layout)")
        last_block = last_transformer.transformer_blocks[-1]
        last_key = next(k for k in self.bank_keys if modules[k] is last_block)
        last_transformer.transformer_blocks[-1] = _BankWriteOnlyBlock(last_block.norm1, last_key)
        last_transformer.proj_out = nn.Identity()
        unet.conv_norm_out = None
        unet.conv_act = None
        unet.conv_out = nn.Identity()
        self.unet = unet

        cross_dim = unet.config.cross_attention_dim
        if not isinstance(cross_dim, int):
            raise ValueError(f"ReferenceNet: cross_attention_dim must be one int, got {cross_dim!r}")
        self.null_context = nn.Parameter(torch.zeros(1, null_context_tokens, cross_dim))

    def forward(self, ref_latents: torch.Tensor, timestep: int | torch.Tensor = 0) -> dict[str, torch.Tensor]:
        """``ref_latents``: ``(B, C, h, w)``. Returns the bank: block key -> ``(B, h_l * w_l, C_l)`` tokens."""
        if ref_latents.ndim != 4:
            raise ValueError(f"ref_latents must be (B, C, h, w), got shape {tuple(ref_latents.shape)}")
        b = ref_latents.shape[0]
        t = torch.as_tensor(timestep, device=ref_latents.device)
        t = t.expand(b) if t.ndim == 0 else t
        ctx = AttentionContext(num_frames=1)
        self.unet(ref_latents, t, encoder_hidden_states=self.null_context.to(ref_latents.dtype).expand(b, -1, -1),
                  cross_attention_kwargs={"attn_context": ctx}, return_dict=False)
        missing = [k for k in self.bank_keys if k not in ctx.reference_bank]
        if missing:
            raise RuntimeError(f"ReferenceNet wrote no tokens for blocks {missing}")
        return ctx.reference_bank
