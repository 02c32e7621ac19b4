"""Loss terms beyond the latent diffusion loss.

EchoMimicV2's Phase-specific Denoising Loss (§3.5, Eq. 2-5): :class:`PhDLoss` composes a pose loss (Eq. 2), a Sobel
detail loss (Eq. 3) and an LPIPS low-level loss (Eq. 4) over the timestep bands S1 / S2 / S3 (§4.1).
"""

from halfbody.losses.base import PixelLoss, composite_valid, masked_mean, per_clip
from halfbody.losses.detail import DetailLoss, sobel_edges
from halfbody.losses.lpips_loss import LowLevelLoss, load_state_dict_file, lpips_linear_weights_path
from halfbody.losses.phd import PAPER_SCHEDULE, PhDLoss, PhDOutput, parse_schedule
from halfbody.losses.pose_extractor import (
    ExportedPoseExtractor,
    PoseExtractor,
    PoseLoss,
    RandomConvPoseExtractor,
    TorchScriptPoseExtractor,
)
from halfbody.losses.timestep_bands import PAPER_BAND_FRACTIONS, TimestepBands

__all__ = [
    "PixelLoss", "per_clip", "composite_valid", "masked_mean",
    "DetailLoss", "sobel_edges",
    "LowLevelLoss", "load_state_dict_file", "lpips_linear_weights_path",
    "PoseExtractor", "PoseLoss", "ExportedPoseExtractor", "RandomConvPoseExtractor", "TorchScriptPoseExtractor",
    "PhDLoss", "PhDOutput", "PAPER_SCHEDULE", "parse_schedule",
    "TimestepBands", "PAPER_BAND_FRACTIONS",
]
