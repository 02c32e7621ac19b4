"""Consolidate a sharded checkpoint (``trainer=fsdp``) into one safetensors file that ``generate`` reads.

    python -m halfbody.consolidate logs/train/runs/<run>/checkpoints/last.ckpt            # -> .../last.safetensors
    python -m halfbody.consolidate <run>/checkpoints/step_0001000.ckpt --out model.safetensors
    python -m halfbody.generate ckpt_path=<run>/checkpoints/last.safetensors ref=me.png audio=talk.wav pose=me.npy

Runs in one process on the CPU without a process group, whatever the number of processes that wrote the checkpoint.
The file holds the module's full state dict (keys as in a Lightning ``.ckpt``) and, in its safetensors metadata, the
global step, hyperparameters and callback states (the curriculum phase generate applies); the format is documented
in :mod:`halfbody.utils.sharded_checkpoint`. It is written to a temporary name beside the target and renamed. Written
beside the checkpoint (the default), generate finds the run's ``.hydra/config.yaml`` as for a ``.ckpt``. A missing,
incomplete or unreadable checkpoint is one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from halfbody.utils.errors import UserError, exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halfbody.consolidate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a sharded checkpoint directory, e.g. <run>/checkpoints/last.ckpt")
    parser.add_argument("--out", default=None, help="the safetensors file (default: <checkpoint>.safetensors beside it)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        from halfbody.utils.sharded_checkpoint import consolidate, is_sharded_checkpoint

        src = Path(args.checkpoint)
        if not src.exists():
            raise UserError(f"checkpoint={args.checkpoint!r} does not exist: expected a sharded checkpoint directory "
                            "(<run>/checkpoints/<name>.ckpt written under trainer=fsdp)")
        if not is_sharded_checkpoint(src):
            raise UserError(f"checkpoint={args.checkpoint!r} is not a sharded checkpoint (no meta.pt / .metadata "
                            "inside); a single-file .ckpt needs no consolidation, generate reads it as it is")
        if args.out is not None and Path(args.out).suffix != ".safetensors":
            raise UserError(f"--out={args.out!r}: expected a .safetensors file name")
        out = consolidate(src, args.out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
