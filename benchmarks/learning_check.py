"""The learning check: train the tiny EchoMimicV2 preset on the synthetic world on CPU for a fixed wall budget
and report audio-driven mouth sync against its shifted-audio control (halfbody.metrics.oracle.mouth_sync).

    python benchmarks/learning_check.py [extra Hydra overrides]     # or: make learning-check

It runs the real entry point (``python -m halfbody.train experiment=learning_check``), then reads the
validation curve from the run's CSV log and prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["val/oracle/mouth_sync", "val/oracle/mouth_sync_control", "val/oracle/mouth_sync_margin",
           "val/oracle/hand_error", "val/oracle/identity_distance", "val/oracle/flicker", "val/loss"]


def read_curve(run_dir: Path) -> list[dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for path in sorted(run_dir.glob("csv/**/metrics.csv")):
        with open(path) as fh:
            for row in csv.DictReader(fh):
                if not row.get("val/loss"):
                    continue
                step = int(float(row["step"]))
                rows.setdefault(step, {"step": step}).update(
                    {k: float(row[k]) for k in COLUMNS if row.get(k) not in (None, "")})
    return [rows[s] for s in sorted(rows)]


def main(argv: list[str]) -> int:
    run_dir = ROOT / "logs" / "learning_check" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    cmd = [sys.executable, "-m", "halfbody.train", "experiment=learning_check", f"hydra.run.dir={run_dir}", *argv]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.time() - start
    if proc.returncode != 0:
        print(f"training failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    curve = read_curve(run_dir)
    if not curve:
        print(f"no validation rows in {run_dir}/csv", file=sys.stderr)
        return 1
    print(f"\nrun dir: {run_dir}\nwall time: {wall / 60:.1f} min\n")
    print("| step | mouth sync | shifted-audio control | margin | hand error | identity dist. | flicker | val loss |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in curve:
        vals = [r.get(k, float("nan")) for k in COLUMNS]
        print(f"| {r['step']} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    last = curve[-1]
    margin = last.get("val/oracle/mouth_sync_margin", float("nan"))
    print(f"\nfinal margin (sync - control): {margin:.3f}; target >= 0.5: {'met' if margin >= 0.5 else 'not met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
