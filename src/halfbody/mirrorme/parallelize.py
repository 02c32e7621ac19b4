"""Parallelism for the MirrorMe DiT, applied from outside it (docs/ARCHITECTURE.md "Parallelism").

The blocks are LTX-Video's transformer blocks (MirrorMe §3.1) and the audio adapters inserted after every ``k`` of them
(§3.3, Eq. 5-7) and the hand guider (§3.4: full-resolution convolutions over every frame). FSDP2 units: those, then
the causal audio encoder (§3.3), then the network root (patchify ``proj_in``, timestep embedding, RoPE, caption projection and null caption,
output norm and ``proj_out``). ``encode_conditions`` (audio and hand features computed once for all sampling steps)
gets the root's FSDP hooks.
"""

from __future__ import annotations

import logging

from torch import nn

from halfbody.models.parallel import Parallelism, parallelize_blocks

log = logging.getLogger(__name__)


def parallelize_mirrorme(network: nn.Module, settings: Parallelism, mesh=None) -> dict[str, int]:
    """Activation checkpointing, ``torch.compile`` and (with ``mesh``) FSDP2 on a ``MirrorMeTransformer``."""
    blocks = [*network.transformer.transformer_blocks, *network.audio_adapters,
              *([network.hand_pose_encoder] if network.hand_pose_encoder is not None else [])]
    units = [*blocks, network.audio_encoder]
    if settings.activation_checkpointing and getattr(network, "gradient_checkpointing", False):
        log.info("model.network.gradient_checkpointing is on too: blocks are checkpointed by parallelize instead")
        network.gradient_checkpointing = False  # one recomputation per block, not two
    done = parallelize_blocks(network, settings, mesh, blocks=blocks, units=units,
                              forward_methods=("encode_conditions",))
    log.info("MirrorMe parallelism: %s", done)
    return done
