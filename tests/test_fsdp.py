"""FSDP2 through Lightning (``trainer=fsdp``), parallelism applied from outside the models, sharded checkpoints.

Real 2-process CPU runs (gloo) of ``python -m halfbody.train`` on synthetic-world shards. Each run records, per rank
and step, the batch it received, its step generator's seed and its loss (``fsdp_helpers.StepRecorder``). A
1-process reference then trains the same model on the same global batch, in this test process, without a Trainer:
per step, the mean of the two ranks' losses (each rank's half of the batch with that rank's generator), one backward,
gradient clipping at ``trainer.gradient_clip_val``, one optimizer step. FSDP2 must give the same losses, up to float32
summation order: tolerance ``rel=1e-4`` on every loss (docs/ARCHITECTURE.md "Parallelism").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch

from config_utils import compose_train
from fsdp_helpers import load_steps
from halfbody.utils.errors import UserError
from halfbody.utils.hydra import REPO_ROOT

TESTS = Path(__file__).resolve().parent
LOSS_REL = 1e-4  # FSDP2 (2 processes, fp32) vs the 1-process reference: float32 reduction order only

WORLD = ["data.prepare.train_clips=8", "data.prepare.val_clips=2", "data.prepare.num_identities=4",
         "data.prepare.resolution=64", "data.prepare.num_frames=20", "data.prepare.headshot_fraction=0.25",
         "data.prepare.workers=1"]
COMMON = ["logger=none", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0",
          "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "data.num_workers=0", "data.batch_size=1",
          "data.batches_per_epoch=2", "~callbacks.sample_videos", "data.resolution=32"]
# two phases: the ReferenceNet is frozen throughout (no gradients, no optimizer state); phase 'audio' freezes more
PHASES = [dict(name="body", steps=2, trainable=["denoising_unet", "pose_encoder", "audio_attention", "temporal"]),
          dict(name="audio", steps=4, trainable=["audio_attention", "temporal"])]
ECHO = ["family=echomimic_v2", "data.num_frames=4", "callbacks=curriculum", "model.phd_loss=null",  # latent loss only
        "callbacks.curriculum.phases=[" + ",".join(
            "{name:%s,steps:%d,trainable:[%s]}" % (p["name"], p["steps"], ",".join(p["trainable"])) for p in PHASES)
        + "]"]
MIRRORME = ["family=mirrorme", "data.num_frames=9"]
FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "parallelize.fsdp.param_dtype=fp32"]


def _launch(args: list[str], cwd: Path, timeout: int = 600, kill_expected: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HALFBODY_ROOT": str(REPO_ROOT), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "halfbody.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)  # its own process group (KillAt)
    if kill_expected:
        assert proc.returncode == -9, f"rc={proc.returncode}\n" + proc.stdout[-2000:] + proc.stderr[-4000:]
    else:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _record(dirpath: Path) -> list[str]:
    return ["+callbacks.recorder._target_=fsdp_helpers.StepRecorder", f"+callbacks.recorder.dirpath={dirpath}"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp_data")


@pytest.fixture(scope="module")
def echo_run(data_dir, tmp_path_factory) -> Path:
    """EchoMimicV2 under FSDP2, 2 processes, global batch 2: a checkpoint at step 2 (an epoch start; phase 'body'
    done, 'audio' begins) and hard-killed (SIGKILL to every rank) after step 4."""
    out = tmp_path_factory.mktemp("echo_fsdp")
    _launch([*FSDP, "trainer.devices=2", "parallelize.global_batch_size=2", *ECHO, *COMMON, *WORLD,
             f"paths.data_dir={data_dir}", "trainer.max_steps=6", *_record(out / "steps"),
             "+callbacks.kill._target_=fsdp_helpers.KillAt", "+callbacks.kill.step=4", f"hydra.run.dir={out}"],
            out, kill_expected=True)
    return out


# --------------------------------------------------------------------------------------------- the 1-process reference
class Reference:
    """The model of a run's config trained in this process on recorded batches (see the module docstring)."""

    def __init__(self, overrides: list[str]) -> None:
        cfg = compose_train(overrides)
        L.seed_everything(cfg.seed, workers=True)  # as halfbody.train: seed, datamodule, model
        hydra.utils.instantiate(cfg.data)
        self.model = hydra.utils.instantiate(cfg.model).train()
        opt = self.model.configure_optimizers()
        self.optimizer, self.scheduler = (opt, None) if isinstance(opt, torch.optim.Optimizer) else (
            opt["optimizer"], opt["lr_scheduler"]["scheduler"])
        self.clip = float(cfg.trainer.gradient_clip_val)
        self.phases = cfg.callbacks.get("curriculum", {}).get("phases") if "curriculum" in cfg.callbacks else None

    def set_phase(self, step: int) -> None:
        if not self.phases:
            return
        from halfbody.phases import Curriculum

        index, spec, k = Curriculum(list(self.phases)).phase_at(step)
        if k == 0 or step == 0 or getattr(self, "_phase", None) != index:
            self.model.apply_phase(spec, k)
            self._phase = index

    def step(self, records: list[dict]) -> list[float]:
        """One optimizer step on the ranks' ``records`` of one global step; returns each rank's loss."""
        self.set_phase(records[0]["step"])
        self.optimizer.zero_grad(set_to_none=True)
        losses = [self.model.diffusion_loss(r["batch"], generator=torch.Generator().manual_seed(r["seed"]))[0]
                  for r in records]
        (sum(losses) / len(losses)).backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return [float(x.detach()) for x in losses]

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def _check_parity(ref: Reference, steps: dict, step_range, ranks=(0, 1)) -> None:
    for s in step_range:
        records = [steps[r, s] for r in ranks]
        got = ref.step(records)
        for r, loss in zip(ranks, got):
            assert steps[r, s]["loss"] == pytest.approx(loss, rel=LOSS_REL), f"step {s} rank {r}"


# ---------------------------------------------------------------------------------------------------- fast tests
def test_echomimic_v2_fsdp_two_processes_match_one_process(echo_run, data_dir):
    steps = load_steps(echo_run / "steps")
    assert sorted(steps) == [(r, s) for r in (0, 1) for s in range(4)]  # killed after step 4
    for (rank, step), rec in steps.items():
        assert rec["sharded"], "the network is not an FSDP module"
        assert rec["local_numel"] < 0.6 * rec["numel"], "each rank should hold about half of the parameters"
        # the ReferenceNet is frozen in both phases: no gradients and no optimizer state on any rank
        assert rec["frozen"]["reference_net"] == {"grads": 0, "states": 0}, (rank, step)
        assert all(v["grads"] == 0 for v in rec["frozen"].values()), (rank, step)
        assert rec["trainable"] == sorted(PHASES[0 if step < 2 else 1]["trainable"]), (rank, step)
    assert steps[0, 0]["batch"]["key"] != steps[1, 0]["batch"]["key"], "both ranks trained on the same sample"
    ref = Reference([*ECHO, *COMMON, f"paths.data_dir={data_dir}"])
    _check_parity(ref, steps, range(4))
    # the sharded checkpoint of step 2 is complete, no temporary directory is left
    ckpt = echo_run / "checkpoints" / "step_0000002.ckpt"
    assert (ckpt / "meta.pt").is_file() and (ckpt / ".metadata").is_file()
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list((echo_run / "checkpoints").glob(".*.tmp"))
    # killed after step 4 before its save: last.ckpt is still the complete step-2 checkpoint
    from halfbody.utils.sharded_checkpoint import inspect_sharded_checkpoint

    assert inspect_sharded_checkpoint(echo_run / "checkpoints" / "last.ckpt", "ckpt_path", resume=True)["global_step"] == 2


def test_mirrorme_fsdp_two_processes_match_one_process(data_dir, tmp_path):
    _launch([*FSDP, "trainer.devices=2", *MIRRORME, *COMMON, *WORLD, f"paths.data_dir={data_dir}",
             "trainer.max_steps=2", "trainer.val_check_interval=4", *_record(tmp_path / "steps"),
             f"hydra.run.dir={tmp_path}"], tmp_path)
    steps = load_steps(tmp_path / "steps")
    assert sorted(steps) == [(r, s) for r in (0, 1) for s in range(2)]
    assert all(rec["sharded"] and rec["local_numel"] < 0.6 * rec["numel"] for rec in steps.values())
    ref = Reference([*MIRRORME, *COMMON, f"paths.data_dir={data_dir}"])
    _check_parity(ref, steps, range(2))


def test_consolidated_checkpoint_holds_the_trained_weights_and_generate_reads_it(echo_run, data_dir, tmp_path):
    from halfbody.consolidate import main as consolidate_main
    from halfbody.utils.checkpoint_io import inspect_checkpoint

    ckpt = echo_run / "checkpoints" / "step_0000002.ckpt"
    out = tmp_path / "step2.safetensors"
    assert consolidate_main([str(ckpt), "--out", str(out)]) == 0
    assert out.is_file() and not list(tmp_path.glob(".*.tmp"))
    loaded = inspect_checkpoint(out, "ckpt_path")  # what generate reads
    assert loaded["global_step"] == 2
    assert loaded["callbacks"]["CurriculumCallback"]["phase_name"] == "body"  # the phase of the last step taken
    # the weights are those the 1-process reference has after the same two steps
    # Adam's m / sqrt(v) turns float32 summation-order noise in tiny gradients into visible update differences, so
    # each tensor must match within 5 % of how far the two steps moved it (measured: 1.7 % at most); frozen ones exactly
    steps = load_steps(echo_run / "steps")
    ref = Reference([*ECHO, *COMMON, f"paths.data_dir={data_dir}"])
    initial = ref.state()
    for s in range(2):
        ref.step([steps[0, s], steps[1, s]])
    expected = ref.state()
    weights = loaded["state_dict"]
    assert set(weights) == set(expected)
    moved = 0
    for k, v in expected.items():
        step = float((v - initial[k]).abs().max()) if v.is_floating_point() else 0.0
        moved += step > 0
        assert float((weights[k].to(v.dtype) - v).abs().max()) <= 0.05 * step + 1e-7, k
    assert moved > 100 and all(torch.equal(weights[k], initial[k]) for k in initial if k.startswith("network.reference_net."))
    # generate reads it: one mp4 from a reference image, audio and a pose
    _generate_from(out, data_dir, tmp_path)


def _generate_from(ckpt: Path, data_dir: Path, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict
    from PIL import Image

    from halfbody.data import media
    from halfbody.generate import generate
    from halfbody.utils.hydra import CONFIG_DIR
    from shard_utils import person_keypoints

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    media.write_wav(tmp_path / "talk.wav", (0.3 * np.sin(np.arange(6400) / 10)).astype(np.float32), 16000)
    np.save(tmp_path / "pose.npy", person_keypoints(10))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="generate", return_hydra_config=True, overrides=[
            f"ckpt_path={ckpt}", f"ref={tmp_path / 'ref.png'}", f"audio={tmp_path / 'talk.wav'}",
            f"pose={tmp_path / 'pose.npy'}", f"output={tmp_path / 'out.mp4'}", "steps=1", "progress=false",
            "resolution=32", "family=echomimic_v2"])
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = str(tmp_path)
        del cfg.hydra
    generate(cfg)
    frames, _ = media.read_video(tmp_path / "out.mp4")
    assert frames.shape[1:] == (32, 32, 3) and frames.shape[0] >= 1


def test_consolidate_bad_input_is_one_line(tmp_path, capsys):
    from halfbody.consolidate import main as consolidate_main

    (tmp_path / "single.ckpt").write_bytes(b"PK")
    for argv, match in (([str(tmp_path / "missing.ckpt")], "does not exist"),
                        ([str(tmp_path / "single.ckpt")], "is not a sharded checkpoint"),
                        ([str(tmp_path)], "is not a sharded checkpoint")):
        with pytest.raises(SystemExit) as e:
            consolidate_main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: checkpoint=") and match in err[0]


@pytest.mark.parametrize("exchange", [True, False])
def test_sharded_save_swaps_the_directory_in_whole(tmp_path, monkeypatch, exchange):
    """The new checkpoint directory replaces the old one in one step (renameat2 RENAME_EXCHANGE, or two renames where
    the filesystem has no exchange); nothing of either is left behind."""
    from halfbody.utils import sharded_checkpoint as sc

    if not exchange:
        monkeypatch.setattr(sc, "_exchange", lambda a, b: False)
    target = tmp_path / "last.ckpt"
    for version in ("old", "new"):
        tmp = tmp_path / f".last.ckpt.{version}.tmp"
        tmp.mkdir()
        (tmp / "meta.pt").write_text(version)
        (tmp / f"__{version}.distcp").write_text(version)
        sc.replace_path(tmp, target)
        assert (target / "meta.pt").read_text() == version and not tmp.exists()
    assert sorted(p.name for p in target.iterdir()) == ["__new.distcp", "meta.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("overrides, match", [
    (["trainer=fsdp", "trainer.precision=16-mixed"], r"^trainer.precision=16-mixed: under trainer=fsdp"),
    (["trainer=fsdp", "parallelize.fsdp.param_dtype=fp16"], r"^parallelize.fsdp.param_dtype='fp16': expected fp32"),
    (["trainer=fsdp", "trainer.devices=2", "parallelize.global_batch_size=3"],
     r"^parallelize.global_batch_size=3: not divisible by trainer.devices x trainer.num_nodes = 2 process"),
    (["trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2", "parallelize.global_batch_size=16",
      "data.batch_size=4"], r"^data.batch_size=4: .* is 2 per process; set data.batch_size=2"),
    (["trainer=fsdp", "+callbacks.ema._target_=halfbody.callbacks.ema.EMAWeights"],
     r"^callbacks.ema=halfbody.callbacks.ema.EMAWeights: the EMA of the weights does not support trainer=fsdp"),
    (["parallelize.compile=true", "parallelize.compile_backend=warp_drive"],
     r"^parallelize.compile_backend='warp_drive': not a torch.compile backend"),
])
def test_bad_parallel_configuration_is_one_line(overrides, match, tmp_path):
    from halfbody.utils.startup_checks import check_config

    with pytest.raises(UserError, match=match) as e:
        check_config(compose_train(["data=shards", f"data.train_shards={tmp_path}", *overrides]))
    assert "\n" not in str(e.value)


def test_sharded_checkpoint_without_the_strategy_is_one_line(echo_run):
    from halfbody.utils.startup_checks import check_config

    ckpt = echo_run / "checkpoints" / "step_0000002.ckpt"
    for trainer in ("cpu", "ddp"):
        with pytest.raises(UserError, match=r"^ckpt_path='.*step_0000002.ckpt' is a sharded checkpoint .* resume it "
                                            r"with trainer=fsdp .* python -m halfbody.consolidate"):
            check_config(compose_train([f"trainer={trainer}", f"ckpt_path={ckpt}", "data.prepare=null",
                                        f"data.train_shards={echo_run}"]))
    # under trainer=fsdp it is accepted (family checked from the shards' keys)
    from halfbody.utils.startup_checks import check_checkpoints

    check_checkpoints(compose_train(["trainer=fsdp", f"ckpt_path={ckpt}"]))
    with pytest.raises(UserError, match=r"is a checkpoint of family echomimic_v2, but this run builds family mirrorme"):
        check_checkpoints(compose_train(["trainer=fsdp", "family=mirrorme", f"ckpt_path={ckpt}"]))


def test_activation_checkpointing_keeps_the_loss_and_gradients(data_dir):
    """AC per block (applied from outside, no wrapper modules: the state-dict keys stay) recomputes the same maths."""
    from halfbody.models.parallel import Parallelism, is_checkpointed
    from halfbody.echomimic_v2.parallelize import unet_blocks

    cfg = compose_train(["data.num_frames=2", "data.resolution=32", "model.phd_loss=null"])
    torch.manual_seed(0)
    plain = hydra.utils.instantiate(cfg.model).train()
    checkpointed = hydra.utils.instantiate(cfg.model).train()
    checkpointed.load_state_dict(plain.state_dict())
    keys = list(checkpointed.state_dict())
    checkpointed.parallelism = Parallelism(activation_checkpointing=True)
    checkpointed.configure_model()
    assert list(checkpointed.state_dict()) == keys
    blocks = unet_blocks(checkpointed.network.denoising_unet.unet)
    assert all(is_checkpointed(b) for b in blocks)
    g = torch.Generator().manual_seed(0)
    b, f, s = 1, 2, 32
    batch = {"video": torch.rand(b, f, 3, s, s, generator=g) * 2 - 1, "ref": torch.rand(b, 3, s, s, generator=g) * 2 - 1,
             "audio": torch.randn(b, int(f / 25 * 16000), generator=g) * 0.1, "pose": torch.rand(b, f, 3, s, s, generator=g),
             "mask_lips": torch.ones(b, f, 1, s, s), "mask_head": torch.ones(b, f, 1, s, s),
             "mask_face": torch.ones(b, f, 1, s, s), "valid": torch.ones(b, f, 1, s, s), "fps": torch.tensor([25.0])}
    grads = []
    for model in (plain, checkpointed):
        loss, _ = model.diffusion_loss(dict(batch), generator=torch.Generator().manual_seed(1))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.network.named_parameters() if p.grad is not None})
        grads[-1]["loss"] = loss.detach()
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


# ---------------------------------------------------------------------------------------------------- slow tests
@pytest.mark.slow
def test_killed_two_process_run_resumes_exactly(echo_run, data_dir, tmp_path):
    """The run killed after step 4 resumes from its sharded step-2 checkpoint (phase 'audio', an epoch start) with 2
    processes: the same batches, the same phase and the same losses as before the kill."""
    killed = load_steps(echo_run / "steps")
    _launch([*FSDP, "trainer.devices=2", "parallelize.global_batch_size=2", *ECHO, *COMMON, *WORLD,
             f"paths.data_dir={data_dir}", "trainer.max_steps=4", *_record(tmp_path / "steps"),
             f"ckpt_path={echo_run / 'checkpoints' / 'step_0000002.ckpt'}", f"hydra.run.dir={tmp_path}"], tmp_path)
    resumed = load_steps(tmp_path / "steps")
    assert sorted(resumed) == [(r, s) for r in (0, 1) for s in (2, 3)]
    for key, rec in resumed.items():
        before = killed[key]
        assert rec["batch"]["key"] == before["batch"]["key"], key  # data position
        torch.testing.assert_close(rec["batch"]["video"], before["batch"]["video"])
        assert rec["seed"] == before["seed"] and rec["trainable"] == before["trainable"], key  # RNG, phase
        assert rec["loss"] == pytest.approx(before["loss"], rel=1e-6, abs=1e-8), key  # weights, optimizer, schedule


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_with_one(echo_run, data_dir, tmp_path):
    """N -> M: the sharded checkpoint written by 2 processes resumes under trainer=fsdp with 1; the reference that
    took the same first two steps (2 ranks) and then this run's batches gives the same losses (weights and the
    re-sharded optimizer moments restored)."""
    _launch([*FSDP, "trainer.devices=1", *ECHO, *COMMON, *WORLD, f"paths.data_dir={data_dir}", "trainer.max_steps=4",
             *_record(tmp_path / "steps"), f"ckpt_path={echo_run / 'checkpoints' / 'step_0000002.ckpt'}",
             f"hydra.run.dir={tmp_path}"], tmp_path)
    one = load_steps(tmp_path / "steps")
    assert sorted(one) == [(0, 2), (0, 3)]
    assert all(rec["trainable"] == sorted(PHASES[1]["trainable"]) for rec in one.values())
    two = load_steps(echo_run / "steps")
    ref = Reference([*ECHO, *COMMON, f"paths.data_dir={data_dir}"])
    for s in range(2):
        ref.step([two[0, s], two[1, s]])
    _check_parity(ref, one, (2, 3), ranks=(0,))


@pytest.mark.slow
def test_cli_sharded_checkpoint_without_the_strategy_exits_2_in_one_line(echo_run, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HALFBODY_ROOT": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "halfbody.train", "trainer=cpu",
                           f"ckpt_path={echo_run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ckpt_path=") and "trainer=fsdp" in lines[0]


@pytest.mark.slow
def test_two_node_fsdp_on_localhost_with_activation_checkpointing(data_dir, tmp_path):
    """Two launches of torchrun --nnodes=2 (one process each) on localhost: one FSDP2 job across both "nodes", bf16
    parameters with fp32 reduction (the trainer=fsdp defaults) and activation checkpointing; the sharded checkpoint
    has a shard per node."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WANDB_MODE": "disabled", "HALFBODY_ROOT": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    args = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
            "parallelize.activation_checkpointing=true", *MIRRORME, *COMMON, *WORLD, f"paths.data_dir={data_dir}",
            "trainer.max_steps=2", f"hydra.run.dir={tmp_path}"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "-m", "halfbody.train", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_compile_per_block_under_one_device(data_dir, tmp_path):
    """parallelize.compile under a plain one-device trainer: every block compiled in place, keys unchanged, a run
    trains (backend aot_eager: dynamo + AOTAutograd, no C++ toolchain needed)."""
    from halfbody.train import train

    cfg = compose_train(["family=mirrorme", "data.num_frames=9", *COMMON, *WORLD, f"paths.data_dir={data_dir}",
                         "trainer.max_steps=2", "trainer=cpu", "parallelize.compile=true",
                         "parallelize.compile_backend=aot_eager", "parallelize.activation_checkpointing=true"], tmp_path)
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k or "checkpoint_wrapped" in k for k in state)
