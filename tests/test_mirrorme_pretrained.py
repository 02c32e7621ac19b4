"""The MirrorMe paper-scale preset through the real config path: tiny random LTX-Video (transformer + VAE) and
wav2vec2 saved with ``save_pretrained`` load back via ``experiment=mirrorme_stage2`` and train; missing directories
fail naming their config key."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import open_dict

from config_utils import compose_train
from pretrained_parts import save_tiny_ltx_vae

# the paper-scale network config with widths cut to the tiny saved parts (the classes and loading path are the same)
SMALL = ["model.network.adapter_heads=2", "model.network.adapter_head_dim=8", "model.network.audio_dim=16",
         "model.network.audio_tokens=2", "model.network.audio_encoder_channels=16", "model.network.adapter_every=1",
         "model.network.pose_channels=4", "+model.network.pose_block_out_channels=[4,4,4,4,4,4]"]


def _compose(overrides: list[str]):
    return compose_train(["experiment=mirrorme_stage2", *overrides])


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """Tiny random stand-ins of LTX-Video 2B (diffusers layout) and wav2vec2-base in the layout the config expects."""
    from diffusers import LTXVideoTransformer3DModel
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from halfbody.mirrorme.transformer import tiny_ltx_config

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    LTXVideoTransformer3DModel(**tiny_ltx_config(8, num_layers=2, caption_channels=16)).save_pretrained(
        root / "LTX-Video" / "transformer")
    save_tiny_ltx_vae(root / "LTX-Video" / "vae")
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
                  ).save_pretrained(root / "wav2vec2-base")
    return root


def test_missing_parts_name_their_config_key(pretrained_dir, tmp_path):
    with pytest.raises(Exception) as err:
        hydra.utils.instantiate(_compose([f"paths.pretrained_dir={tmp_path}/nothing"]).model)
    assert "model.autoencoder.path" in "".join(str(e) for e in (err.value, err.value.__cause__) if e)
    (tmp_path / "partial" / "LTX-Video").mkdir(parents=True)
    (tmp_path / "partial" / "LTX-Video" / "vae").symlink_to(pretrained_dir / "LTX-Video" / "vae")
    (tmp_path / "partial" / "wav2vec2-base").symlink_to(pretrained_dir / "wav2vec2-base")
    with pytest.raises(Exception) as err:
        hydra.utils.instantiate(_compose([f"paths.pretrained_dir={tmp_path}/partial", *SMALL]).model)
    assert "model.network.transformer_dir" in "".join(str(e) for e in (err.value, err.value.__cause__) if e)


def test_mirrorme_stage2_trains_at_paper_scale_from_saved_parts(pretrained_dir, tmp_path):
    """experiment=mirrorme_stage2 with every part loaded from pretrained/ (LTX VAE: 8x time, 32x space); only the
    compute is cut down for CPU (trainer, clip size, one step)."""
    from data_pipelines.synthetic_world import generate_shards
    from halfbody.train import train

    generate_shards(tmp_path / "world", num_clips=2, num_frames=20, resolution=64, workers=0, headshot_fraction=0)
    cfg = _compose([f"paths.pretrained_dir={pretrained_dir}", f"data.train_shards={tmp_path}/world",
                    "trainer=cpu", "trainer.precision=32-true", "trainer.limit_val_batches=0",
                    "trainer.enable_progress_bar=false", "logger=none", "callbacks.curriculum.max_steps_per_phase=1",
                    "callbacks.model_checkpoint.every_n_train_steps=1", "data.resolution=64", "data.num_frames=9",
                    "data.batch_size=1", "data.num_workers=0", *SMALL])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 1
    assert any(k.startswith("network.transformer.transformer_blocks.1.") for k in state["state_dict"])
    assert state["state_dict"]["autoencoder.vae.latents_std"][-1] == 2.0  # the saved VAE, normalisation included
