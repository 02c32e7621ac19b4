"""`python -m halfbody.train` with no arguments, exactly as a newcomer runs it (slow: ~1-2 min on 2 cores).

Run with `make test-slow`. The repository root is redirected (HALFBODY_ROOT) so data and logs land in a temporary
folder; W&B runs offline as it does for users.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_default_run_trains_and_leaves_checkpoint_wandb_run_and_sample(tmp_path):
    env = {**os.environ, "HALFBODY_ROOT": str(tmp_path), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "halfbody.train"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    wall = time.time() - start
    assert proc.returncode == 0, proc.stderr[-5000:]
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "samples").glob("*.mp4"))
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb")), "no offline W&B run"
    assert (tmp_path / "data" / "synthetic_world" / "train" / "manifest.json").is_file()
    assert wall < 180, f"the default run took {wall:.0f} s (> 3 min)"
