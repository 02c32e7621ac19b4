"""EchoMimicV2 (UNet family): one file per box of the paper's Figure 2."""

from .attention_processors import (
    AUDIO_MODES,
    AttentionContext,
    AudioCrossAttnProcessor,
    PlainAttnProcessor,
    ReferenceReadAttnProcessor,
    ReferenceWriteAttnProcessor,
)
from .audio_projection import AudioProjection
from .denoising_unet import DenoisingUNet
from .network import GROUP_NAMES, EchoMimicV2Network, tiny_unet_config
from .pose_encoder import PoseEncoder
from .reference_net import ReferenceNet
from .temporal_module import MotionModule, TemporalTransformer

__all__ = [
    "AUDIO_MODES", "AttentionContext", "AudioCrossAttnProcessor", "AudioProjection", "DenoisingUNet",
    "EchoMimicV2Network", "GROUP_NAMES", "MotionModule", "PlainAttnProcessor", "PoseEncoder", "ReferenceNet",
    "ReferenceReadAttnProcessor", "ReferenceWriteAttnProcessor", "TemporalTransformer",
    "tiny_unet_config",
]
