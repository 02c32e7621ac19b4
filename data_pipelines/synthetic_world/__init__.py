"""The synthetic talker world: procedural cartoon half-body people whose audio drives the mouth.

Public API (the datamodule and the training configs call it)::

    generate_shards(out_dir, num_clips=256, seed=0, num_identities=8, resolution=128, fps=25.0,
                    num_frames=50, headshot_fraction=0.2, clips_per_shard=64, workers=None,
                    ref_fraction=0.5, gestures=False) -> list[Path]
    generate_world(root, train_clips=192, val_clips=16, **generate_shards_params)  # root/train + root/val
    render_clip(WorldConfig(...), index, kind=None) -> Clip   # in memory, with the ground truth

CLI: ``python -m data_pipelines.synthetic_world --out DIR --num-clips N --seed S [--gestures]``.
``gestures=True``: co-speech beat gestures (``gestures.py``), strokes following stressed syllable onsets.
"""

from .generate import (GENERATOR_VERSION, Clip, WorldConfig, clip_kind, encode_clip, generate_shards, generate_world,
                       render_clip)
from .identity import MOUTH_COLOR, Identity, make_identity

__all__ = ["GENERATOR_VERSION", "Clip", "WorldConfig", "clip_kind", "encode_clip", "generate_shards", "generate_world", "render_clip",
           "MOUTH_COLOR", "Identity", "make_identity"]
