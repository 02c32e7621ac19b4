"""Every experiment composes at paper scale and runs on CPU with the one documented override (preset=tiny_cpu)."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from config_utils import compose_train
from halfbody.train import train
from halfbody.utils.hydra import CONFIG_DIR

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("apdh*.yaml"))
MIRRORME_EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("mirrorme*.yaml"))
TABLE1_ROWS = {"baseline", "audio_adapter", "progressive", "hand_guider"}  # MirrorMe §4.3
TABLE2_ABLATIONS = {"no_initial_pose", "no_iterative_pose_sampling", "no_spatial_pose_sampling",
                    "no_headshot_augmentation", "no_audio_lips_sync", "no_audio_face_sync", "no_audio_body_corr",
                    "no_pose_loss", "no_detail_loss", "no_low_loss", "straightforward_baseline"}


_compose = compose_train


def test_stages_full_run_and_every_table2_ablation_exist():
    assert {"apdh_stage1", "apdh_stage2", "apdh_stage3", "apdh_stage4", "apdh_full"} <= set(EXPERIMENTS)
    assert {f"apdh_ablation_{a}" for a in TABLE2_ABLATIONS} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_scale_defaults(name):
    cfg = _compose([f"experiment={name}"])
    assert cfg.model.network._target_.endswith("from_pretrained_parts")
    assert cfg.model.optimizer.lr == 1e-5 and cfg.model.guidance_scale == 2.5  # §4.1
    assert cfg.data.resolution == 768 and cfg.data.batch_size * cfg.trainer.get("accumulate_grad_batches", 1) == 4
    phases = OmegaConf.to_container(cfg.callbacks.curriculum.phases, resolve=True)
    assert all(p["steps"] in (10000, 30000, 60000) for p in phases)


def test_stage3_recipe_reads_like_the_paper():
    phases = OmegaConf.to_container(_compose(["experiment=apdh_stage3"]).callbacks.curriculum.phases, resolve=True)
    assert [(p["pose_groups"], p["audio_region"], p["data"]["kinds"]) for p in phases] == [
        ("no_lips", "lips", ["halfbody"]), ("no_head", "head", ["headshot"]), ("no_head", "head", ["halfbody"]),
        ("hands", "global", ["halfbody"])]
    assert all(p["losses"]["phd"] == {"S1": ["pose", 0.1], "S2": ["detail", 0.1], "S3": ["low", 0.1]} for p in phases)


def test_a_stage_starts_from_the_previous_stage_checkpoint(tmp_path):
    """model.init_checkpoint: the network starts from an earlier stage's weights (loaded with weights_only=True)."""
    cfg = _compose(["experiment=apdh_stage2", "preset=tiny_cpu"])
    first = hydra.utils.instantiate(cfg.model)
    torch.nn.init.normal_(first.network.pose_encoder.conv_out.weight)  # make it differ from a fresh network
    ckpt = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": first.state_dict()}, ckpt)
    second = hydra.utils.instantiate(_compose(["experiment=apdh_stage2", "preset=tiny_cpu",
                                               f"model.init_checkpoint={ckpt}"]).model)
    for k, v in first.network.state_dict().items():
        assert torch.equal(second.network.state_dict()[k], v), k
    with pytest.raises(Exception, match="model.init_checkpoint=.*does not exist"):
        hydra.utils.instantiate(_compose(["experiment=apdh_stage2", "preset=tiny_cpu",
                                          f"model.init_checkpoint={tmp_path}/missing.ckpt"]).model)


def test_paper_scale_without_pretrained_dirs_names_the_missing_key(tmp_path):
    cfg = _compose(["experiment=apdh_stage3", "model.init_checkpoint=null", f"paths.pretrained_dir={tmp_path}/none"])
    with pytest.raises(Exception) as err:
        hydra.utils.instantiate(cfg.model)
    assert "model.autoencoder.path" in "".join(str(e) for e in (err.value, err.value.__cause__) if e)


def test_mirrorme_stages_full_run_and_table1_rows_exist():
    assert {"mirrorme_stage1", "mirrorme_stage2", "mirrorme_full"} <= set(MIRRORME_EXPERIMENTS)
    assert {f"mirrorme_ablation_{r}" for r in TABLE1_ROWS} <= set(MIRRORME_EXPERIMENTS)


@pytest.mark.parametrize("name", MIRRORME_EXPERIMENTS)
def test_mirrorme_paper_scale_defaults(name):
    cfg = _compose([f"experiment={name}"])
    m = cfg.model
    assert m._target_ == "halfbody.mirrorme.module.MirrorMeModule"
    assert m.network._target_.endswith("from_pretrained_parts") and m.autoencoder._target_.endswith("LTXVideoAutoencoder")
    assert m.audio_encoder._target_.endswith("Wav2Vec2AudioEncoder")
    assert m.optimizer._target_ == "torch.optim.Adam" and m.optimizer.lr == 4e-6  # §4.1
    assert (m.num_inference_steps, m.guidance_scale, m.flow.shift) == (15, 2.5, 17.0)  # §4.1
    assert dict(m.condition_dropout) == {"ref": 0.1, "audio": 0.1, "pose": 0.1}  # §4.1
    assert cfg.data.num_frames == 121 and list(cfg.data.resolution) == [768, 512] and cfg.data.batch_size == 1


def test_mirrorme_recipe_reads_like_the_paper():
    phases = OmegaConf.to_container(_compose(["experiment=mirrorme_full"]).callbacks.curriculum.phases, resolve=True)
    assert [(p["name"], p["steps"], p["audio_region"], p["data"]["framing"], "pose_encoder" in p["trainable"])
            for p in phases] == [("face_closeup", 10000, "global", "face", False), ("halfbody", 30000, "face", "full", True)]
    baseline = _compose(["experiment=mirrorme_ablation_baseline"])
    assert baseline.model.network.audio_fusion == "cross_attention"
    assert _compose(["experiment=mirrorme_ablation_audio_adapter"]).model.network.audio_fusion == "adapter"
    progressive = OmegaConf.to_container(_compose(["experiment=mirrorme_ablation_progressive"]).callbacks.curriculum.phases,
                                         resolve=True)
    assert [p["name"] for p in progressive] == ["face_closeup", "halfbody_no_hands"]
    assert all("pose_encoder" in p["muted"] for p in progressive)


def test_the_tiny_preset_follows_the_experiment_family():
    assert _compose(["experiment=mirrorme_stage2", "preset=tiny_cpu"]).model.network._target_.endswith("MirrorMeTransformer.tiny")
    assert _compose(["experiment=apdh_stage2", "preset=tiny_cpu"]).model.network._target_.endswith("EchoMimicV2Network.tiny")


# apdh_stage3 and mirrorme_stage2 run in the fast suite; every other experiment in `make test-slow`.
FAST_RUNS = {"apdh_stage3", "mirrorme_stage2"}


@pytest.mark.parametrize("name", [n if n in FAST_RUNS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in EXPERIMENTS + MIRRORME_EXPERIMENTS])
def test_runs_on_cpu_with_the_tiny_preset(name, tmp_path_factory):
    data = tmp_path_factory.getbasetemp() / "experiments_data"  # one small world shared by all runs
    out = tmp_path_factory.mktemp(name)
    cfg = _compose([f"experiment={name}", "preset=tiny_cpu", f"paths.data_dir={data}", "logger=none",
                    "callbacks.curriculum.max_steps_per_phase=1", "trainer.limit_val_batches=0",
                    "callbacks.model_checkpoint.every_n_train_steps=1",
                    "trainer.enable_progress_bar=false", "data.batch_size=1", "data.prepare.train_clips=10",
                    "data.prepare.val_clips=2", "data.prepare.num_frames=26"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    num_phases = len(cfg.callbacks.curriculum.phases)
    train(cfg)
    state = torch.load(Path(out) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == num_phases  # one step per phase, then the curriculum ends the run
    (phase_state,) = [v for k, v in state["callbacks"].items() if k.startswith("CurriculumCallback")]
    assert phase_state["phase_index"] == num_phases - 1
