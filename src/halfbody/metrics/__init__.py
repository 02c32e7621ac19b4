"""Evaluation metrics. ``oracle``: exact metrics for the synthetic talker world (mouth sync, hands, identity, flicker)."""

from .oracle import (audio_envelope, background_flicker, glove_colors_from_reference, hand_placement,
                     identity_distance, mouth_opening, mouth_sync, oracle_metrics)

__all__ = ["audio_envelope", "background_flicker", "glove_colors_from_reference", "hand_placement",
           "identity_distance", "mouth_opening", "mouth_sync", "oracle_metrics"]
