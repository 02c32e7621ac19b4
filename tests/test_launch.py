"""Launch at scale: the SLURM launcher config composes (without submitting) into a valid submitit job, and the
example sbatch script is well-formed."""

from __future__ import annotations

import os
import subprocess

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from halfbody.utils.hydra import CONFIG_DIR, REPO_ROOT


def test_slurm_launcher_composes_to_one_task_per_gpu(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=4",
                                 "hydra.launcher.partition=gpu", "experiment=mirrorme_stage1"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (4, 8, 8)
    # what the launcher hands submitit (its own mapping), rendered as the sbatch script without submitting
    params = {k: v for k, v in launcher.items() if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    bin_dir = tmp_path / "bin"  # submitit looks for srun before it builds anything; nothing is submitted here
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    from submitit.slurm.slurm import _make_sbatch_string

    script = _make_sbatch_string(command="python -m halfbody.train", folder=tmp_path,
                                 **executor._executor.parameters)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "export WANDB_MODE=offline"):
        assert line in script, script


def test_example_sbatch_script_parses_and_names_the_allocation():
    path = REPO_ROOT / "scripts" / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "srun ",
                 'trainer.num_nodes="${NODES}"', 'hydra.run.dir="${RUN_DIR}"'):
        assert line in text
