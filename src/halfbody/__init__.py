"""halfbody: audio-driven half-body human animation (EchoMimicV2 and MirrorMe families)."""

__version__ = "0.1.0"
