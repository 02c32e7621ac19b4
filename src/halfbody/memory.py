"""Memory estimator entry point: ``python -m halfbody.memory experiment=<name> trainer=fsdp trainer.devices=8``.

Composes the run as ``halfbody.train`` would (``conf/memory.yaml`` extends ``conf/train.yaml``), estimates the
per-GPU memory of every curriculum phase (:mod:`halfbody.utils.memory_model`: states of the meta-device model under
the run's sharding and precision, activations of one simulated training step at the phase's shape), prints one table
per phase with a verdict against ``memory.gpu_gib`` and writes ``memory.json`` into the run folder. Exit code 0 when
every phase fits, 1 when one does not, 2 for a bad config value (one line).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from halfbody.utils.errors import UserError, exit_on_user_error
from halfbody.utils.hydra import CONFIG_DIR
from halfbody.utils.io import atomic_output

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> list:
    from halfbody.utils.memory_model import estimate, phase_shapes

    mem = cfg.get("memory") or {}
    gpu = mem.get("gpu_gib", 80)
    if not isinstance(gpu, (int, float)) or isinstance(gpu, bool) or gpu <= 0:
        raise UserError(f"memory.gpu_gib={gpu!r}: expected the GPU's memory in GiB, a number > 0")
    reserved = mem.get("reserved_gib", 1.5)
    if not isinstance(reserved, (int, float)) or isinstance(reserved, bool) or reserved < 0:
        raise UserError(f"memory.reserved_gib={reserved!r}: expected a number >= 0")
    phases = list(mem.get("phases") or [])
    if phases:
        known = [p.name for p in phase_shapes(cfg)]
        unknown = [p for p in phases if p not in known]
        if unknown:
            raise UserError(f"memory.phases={phases}: {unknown} not in this run's phases {known}")
    return estimate(cfg, gpu_gib=float(gpu), reserved_gib=float(reserved), phases=phases or None)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="memory")
def main(cfg: DictConfig) -> None:
    from halfbody.utils.memory_model import summary_json

    with exit_on_user_error():
        results = run(cfg)
    print("\n\n".join(r.table() for r in results), flush=True)
    out = Path(cfg.paths.output_dir) / "memory.json"
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(summary_json(results), indent=2))
    print(f"written {out}")
    if not all(r.fits for r in results):
        bad = ", ".join(r.phase for r in results if not r.fits)
        print(f"does not fit: {bad}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
