"""How much do an audio encoder's features depend on the audio? (issue 11 diagnostic)

Encodes the same-length audio of N training clips of the synthetic world and reports, per encoder config, the
features' standard deviation *across clips* (same frame, same feature, different audio) relative to their overall
standard deviation. Near 0 means the features are mostly position / bias: a model conditioned on them cannot tell
one clip's speech from another's.

    python benchmarks/audio_feature_spread.py [--shards data/synthetic_world/train] [ENCODER ...]

ENCODER names a file in conf/model/audio_encoder/ (default: the tiny presets' random encoders); KEY=VALUE after a
name overrides its config, e.g. ``whisper_random_tiny random_config.init_std=0.1``.
"""

from __future__ import annotations

import argparse
import glob
import tarfile

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf

from halfbody.data import media
from halfbody.utils.hydra import CONFIG_DIR

FPS = 25.0


def clip_audio(shards: str, count: int) -> torch.Tensor:
    """The first ``count`` wav fields of the shards under ``shards``, cut to the shortest: ``(count, S)`` at 16 kHz."""
    waves: list[np.ndarray] = []
    for shard in sorted(glob.glob(f"{shards}/*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".wav") and len(waves) < count:
                    wav = media.decode_wav(tar.extractfile(member).read())
                    if wav.rate != media.AUDIO_SAMPLE_RATE:
                        raise SystemExit(f"error: {shard}:{member.name}: rate {wav.rate} Hz (expected 16000)")
                    waves.append(wav.samples)
    if len(waves) < 2:
        raise SystemExit(f"error: --shards={shards}: fewer than 2 wav fields found")
    n = min(w.size for w in waves)
    return torch.tensor(np.stack([w[:n] for w in waves]), dtype=torch.float32)


def spread(name: str, overrides: list[str], audio: torch.Tensor) -> float:
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "model" / "audio_encoder" / f"{name}.yaml"),
                          OmegaConf.from_dotlist(overrides))
    encoder = hydra.utils.instantiate(cfg).eval()
    with torch.no_grad():
        feats = encoder(audio, num_frames=int(audio.shape[1] / media.AUDIO_SAMPLE_RATE * FPS), fps=FPS).float()
    return feats.std(0).mean().item() / feats.std().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="data/synthetic_world/train")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("encoders", nargs="*", default=["whisper_random_tiny", "wav2vec2_random_tiny"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    audio = clip_audio(args.shards, args.clips)
    runs: list[tuple[str, list[str]]] = []
    for item in args.encoders:
        if "=" in item and runs:
            runs[-1][1].append(item)
        else:
            runs.append((item, []))
    print(f"{audio.shape[0]} clips of {audio.shape[1] / media.AUDIO_SAMPLE_RATE:.2f} s from {args.shards}")
    print("| encoder | overrides | std across clips / overall std |\n|---|---|---:|")
    for name, overrides in runs:
        print(f"| {name} | {' '.join(overrides) or '-'} | {spread(name, overrides, audio):.3f} |")


if __name__ == "__main__":
    main()
