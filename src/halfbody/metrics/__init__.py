"""Evaluation metrics. ``oracle``: exact metrics for the synthetic talker world (mouth sync, hands, identity, flicker).

The EMTD metrics of ``python -m halfbody.evaluate`` (docs/EVALUATION.md) live in their own modules, imported where
used (they pull in torch networks): ``inputs`` (pairs, protocol checks), ``evaluation`` (the run), ``report``
(metrics.json / metrics.md / W&B), ``frame_quality`` (SSIM, PSNR, LPIPS), ``frechet``,
``fid``, ``fvd``, ``sync`` (Sync-C / Sync-D), ``hands`` (HKC / HKV), ``csim``, ``face`` (crops), ``weights``; ``gestures``
(beat alignment, diversity, keypoint FD, jitter of the audio2pose family).
"""

from .oracle import (audio_envelope, background_flicker, glove_colors_from_reference, hand_placement,
                     identity_distance, mouth_opening, mouth_sync, oracle_metrics)

__all__ = ["audio_envelope", "background_flicker", "glove_colors_from_reference", "hand_placement",
           "identity_distance", "mouth_opening", "mouth_sync", "oracle_metrics"]
