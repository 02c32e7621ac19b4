"""What generation asks of a model family, through the family's pipeline class (no family is named here).

A family's LightningModule declares ``PIPELINE``, the class of its sampling pipeline (``halfbody.<family>.pipeline``),
which answers, before any model is built:

- ``POSE_REQUIRED`` (bool) and ``MISSING_POSE`` (the one-line reason when a pose is required and not given);
- ``SAMPLER_VARIANTS`` (bool): whether ``sampler=<conf/model/sampler/*>`` applies;
- ``LONG_VIDEO_OPTIONS``: the ``conf/generate.yaml`` keys of its long-video scheme (e.g. MirrorMe's ``clip_frames``,
  ``motion_latent_frames``; EchoMimicV2's context windows need none), checked by
  ``check_long_video(options, temporal_factor)`` (``ValueError`` naming the key).

Once built, the module samples any length with ``generate_video(conditions, num_frames, **long_video_options,
num_inference_steps=, guidance_scale=, generator=)`` and its ``pipeline.network_passes(num_frames, steps,
**long_video_options)`` sizes the progress bar.
"""

from __future__ import annotations

__all__ = ["family_pipeline"]


def family_pipeline(target: str | None) -> tuple[type | None, type | None]:
    """``(module class, pipeline class)`` of the family a ``model._target_`` names (Nones for anything else)."""
    from halfbody.models.families import family_class

    cls = family_class(str(target) if target else None)
    return cls, (getattr(cls, "PIPELINE", None) if cls is not None else None)
