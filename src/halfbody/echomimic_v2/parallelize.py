"""Parallelism for the EchoMimicV2 network, applied from outside it (docs/ARCHITECTURE.md "Parallelism").

The blocks are the UNet blocks of both UNets of Figure 2 (§3.1): every ``down_blocks[i]``, the ``mid_block`` and
every ``up_blocks[i]`` of the ReferenceNet and of the Denoising UNet. A Denoising UNet block carries its motion
modules (the temporal layers, run as forward hooks of the block's layers) and its audio cross-attention, so a block
is recomputed, compiled and sharded with everything it computes.

FSDP2 units, children before parents: each Denoising UNet block, then the ReferenceNet as one unit, the Denoising
UNet (``conv_in``, time embedding, output head) and the Pose Encoder, then the network root (the ablation's audio
projection, if any). The ReferenceNet is not sharded per block: its blocks write the reference bank into the
attention context they are handed, and FSDP2 rebuilds dataclass arguments that carry tensors requiring gradients
(to hook their backward), so per-block units would write into copies; as one unit it gathers its weights once per
forward (SD1.5-sized: 1.7 GB in bf16) and frees them after. ``encode_reference`` (the pipeline runs the ReferenceNet
once per clip) gets the root's FSDP hooks. Only the root casts its inputs to the parameter dtype (the same
argument-rebuilding applies to the cast).
"""

from __future__ import annotations

import logging

from torch import nn

from halfbody.models.parallel import Parallelism, parallelize_blocks

log = logging.getLogger(__name__)


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """A diffusers ``UNet2DConditionModel``'s blocks in execution order."""
    return [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]


def parallelize_echomimic_v2(network: nn.Module, settings: Parallelism, mesh=None) -> dict[str, int]:
    """Activation checkpointing, ``torch.compile`` and (with ``mesh``) FSDP2 on an ``EchoMimicV2Network``."""
    denoiser_blocks = unet_blocks(network.denoising_unet.unet)
    blocks = [*unet_blocks(network.reference_net.unet), *denoiser_blocks]
    units = [*denoiser_blocks, network.reference_net, network.denoising_unet, network.pose_encoder]
    done = parallelize_blocks(network, settings, mesh, blocks=blocks, units=units,
                              forward_methods=("encode_reference",), cast_unit_inputs=False)
    log.info("EchoMimicV2 parallelism: %s", done)
    return done
