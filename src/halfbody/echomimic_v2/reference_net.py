"""ReferenceNet of EchoMimicV2 (paper §3.1 "ReferenceNet-based Backbone", Figure 2).

A copy of the SD1.5 UNet runs once per sample on the clean reference latent (timestep 0). The input of every
self-attention (``attn1``) is written to a reference bank, keyed by the transformer block's name; the denoising
UNet reads the bank in its own self-attentions (:mod:`.attention_processors`).

Write mode as released (``ReferenceAttentionControl(mode="write")``): a block runs ``norm1 -> attn1 -> + -> norm3 ->
ff -> +`` and no cross-attention at all; the released ``reference_unet.pth`` has no ``attn2`` / ``norm2`` either, so
they are removed here.

What can never reach the bank computes nothing, so the ReferenceNet has no unused parameters (DDP with
``find_unused_parameters=False`` works): everything of the last transformer block of the last up block after its
``norm1`` and that transformer's ``proj_out``. The release's file still carries those weights; they are kept as
frozen buffers under their own names (:func:`as_passenger`), so the state dict is the release's key for key and an
export is lossless. ``conv_norm_out`` / ``conv_out`` are dropped: the release's reference UNet has none.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from .attention_processors import AttentionContext, ReferenceWriteAttnProcessor


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


class Passenger(nn.Module):
    """Weights carried for a lossless round trip but never computed with: the original module's tensors as
    persistent buffers under the same names (no gradients, not in ``parameters()``). Called, it returns its input."""

    def forward(self, x, *args, **kwargs):
        return x


def as_passenger(module: nn.Module) -> Passenger:
    """A :class:`Passenger` with ``module``'s parameters and persistent buffers (storage shared, same names)."""
    p = Passenger()
    for name, child in module.named_children():
        sub = as_passenger(child)
        if any(True for _ in sub.buffers()):
            p.add_module(name, sub)
    for name, t in module.named_parameters(recurse=False):
        p.register_buffer(name, t.detach())
    for name, t in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            p.register_buffer(name, t)
    return p


class _BankWriteOnlyBlock(nn.Module):
    """Stand-in for the ReferenceNet's very last transformer block: only its ``norm1`` output matters (bank write).

    Keeps the call signature of ``BasicTransformerBlock`` (diffusers' checkpointing passes arguments positionally)
    and the parameter name ``norm1``; the block's other weights ride along as passengers. Returns ``hidden_states``
    unchanged: nothing downstream is used.
    """

    def __init__(self, block: BasicTransformerBlock, key: str):
        super().__init__()
        self.norm1 = block.norm1
        for name, child in block.named_children():
            if name != "norm1" and child is not None:
                self.add_module(name, as_passenger(child))
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
            cross-attentions removed, tail turned into passengers) and kept as ``self.unet``.
    """

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        check_sd_style_unet(unet, "ReferenceNet")
        self.bank_keys = transformer_block_keys(unet)
        modules = dict(unet.named_modules())
        for key in self.bank_keys:
            blk = modules[key]
            blk.attn1.set_processor(ReferenceWriteAttnProcessor(key))
            blk.attn2 = None  # write mode: no cross-attention (diffusers skips attn2 / norm2 when attn2 is None)
            blk.norm2 = None

        # Remove the tail that can never reach the bank (see module docstring).
        last_transformer = unet.up_blocks[-1].attentions[-1]
        if last_transformer.inner_dim != last_transformer.in_channels:
            raise ValueError("ReferenceNet: transformer inner_dim must equal its in_channels (SD1.5 layout)")
        last_block = last_transformer.transformer_blocks[-1]
        last_key = next(k for k in self.bank_keys if modules[k] is last_block)
        last_transformer.transformer_blocks[-1] = _BankWriteOnlyBlock(last_block, last_key)
        last_transformer.proj_out = as_passenger(last_transformer.proj_out)
        # The release's reference UNet has no output head at all (its unet_2d_condition.py removes it).
        unet.conv_norm_out = None
        unet.conv_act = None
        unet.conv_out = nn.Identity()
        self.unet = unet

    def forward(self, ref_latents: torch.Tensor, timestep: int | torch.Tensor = 0) -> dict[str, torch.Tensor]:
        """``ref_latents``: ``(B, C, h, w)``. Returns the bank: block key -> ``(B, h_l * w_l, C_l)`` tokens."""
        if ref_latents.ndim != 4:
            raise ValueError(f"ref_latents must be (B, C, h, w), got shape {tuple(ref_latents.shape)}")
        b = ref_latents.shape[0]
        t = torch.as_tensor(timestep, device=ref_latents.device)
        t = t.expand(b) if t.ndim == 0 else t
        ctx = AttentionContext(num_frames=1)
        self.unet(ref_latents, t, encoder_hidden_states=None, cross_attention_kwargs={"attn_context": ctx},
                  return_dict=False)
        missing = [k for k in self.bank_keys if k not in ctx.reference_bank]
        if missing:
            raise RuntimeError(f"ReferenceNet wrote no tokens for blocks {missing}")
        return ctx.reference_bank
