"""EchoMimicV2's Pose Encoder ``E_P`` (paper §3.1, §3.2.1, Figure 2).

The encoder itself is shared (:class:`halfbody.models.pose_encoder.PoseEncoder`; its parameter names are those of
the release's ``pose_encoder.pth``: ``conv_in``, ``blocks.<i>``, ``conv_out``, widths ``(16, 32, 96, 256)`` -> 320).
Its output is added to the denoiser's ``conv_in`` output (the release's ``face_musk_fea``), by a forward hook that
:class:`halfbody.echomimic_v2.denoising_unet.DenoisingUNet` installs, so ``conv_in.weight`` keeps its name.
"""

from __future__ import annotations

from halfbody.models.pose_encoder import PoseEncoder

__all__ = ["PoseEncoder"]
