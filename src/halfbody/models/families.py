"""The model families: the one list of their LightningModule targets. What identifies a family (its name, the
state-dict prefixes of its checkpoints, the kind of autoencoder it needs) is declared by the family's module itself
(``AnimationModule.FAMILY``, ``NETWORK_KEY_PREFIXES``, ``VIDEO_AUTOENCODER``); the shared code reads it from there."""

from __future__ import annotations

import importlib

FAMILY_TARGETS = ("halfbody.echomimic_v2.module.EchoMimicV2Module", "halfbody.mirrorme.module.MirrorMeModule",
                  "halfbody.audio2pose.module.Audio2PoseModule")


def family_class(target: str | None) -> type | None:
    """The ``AnimationModule`` subclass a ``model._target_`` names, or None for anything else."""
    from halfbody.models.lightning_base import AnimationModule

    if not target or "." not in str(target):
        return None
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, AnimationModule) and cls.FAMILY else None


def family_classes() -> list[type]:
    """Every family's module class."""
    return [cls for cls in map(family_class, FAMILY_TARGETS) if cls is not None]
