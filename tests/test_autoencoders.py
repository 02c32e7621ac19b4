"""Autoencoders: exact patch round trips, and the SD / LTX VAE wrappers loaded through the real local-dir path."""

from __future__ import annotations

import pytest
import torch

from halfbody.models.autoencoders import Autoencoder, KLAutoencoder, LTXVideoAutoencoder, PatchAutoencoder
from halfbody.models.pretrained import PretrainedNotFoundError

from pretrained_parts import save_tiny_ltx_vae


def _video(b: int, f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, f, 3, h, w, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------- patch autoencoder


@pytest.mark.parametrize("p", [1, 2, 4])
def test_patch_image_round_trip(p: int) -> None:
    ae = PatchAutoencoder(patch_size=p)
    x = _video(2, 3, 8, 16)
    z = ae.encode(x)
    assert z.shape == (2, 3, 3 * p * p, 8 // p, 16 // p)
    assert ae.latent_channels == 3 * p * p and ae.spatial_factor == p and ae.temporal_factor == 1
    torch.testing.assert_close(ae.decode(z), x, rtol=0, atol=1e-6)
    img = x[:, 0]
    zi = ae.encode_image(img)
    assert zi.shape == (2, 3 * p * p, 8 // p, 16 // p)
    torch.testing.assert_close(ae.decode_image(zi), img, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_patch_causal_temporal_round_trip(k: int) -> None:
    ae = PatchAutoencoder(patch_size=2, temporal_patch=8, scaling_factor=2.0)
    assert ae.latent_channels == 3 * 4 * 8 and ae.temporal_factor == 8
    x = _video(2, 1 + 8 * k, 8, 8, seed=k)
    z = ae.encode(x)
    assert z.shape == (2, 1 + k, 96, 4, 4)
    assert ae.latent_num_frames(1 + 8 * k) == 1 + k and ae.pixel_num_frames(1 + k) == 1 + 8 * k
    torch.testing.assert_close(ae.decode(z), x, rtol=0, atol=1e-6)
    # the first latent frame holds frame 0 only (causal): changing later frames leaves it untouched
    x2 = x.clone()
    x2[:, 1:] = 0.5
    torch.testing.assert_close(ae.encode(x2)[:, 0], z[:, 0])
    # a reference image is a one-frame clip
    torch.testing.assert_close(ae.encode_image(x[:, 0]), z[:, 0])
    torch.testing.assert_close(ae.decode_image(z[:, 0]), x[:, 0], rtol=0, atol=1e-6)


def test_patch_errors_and_frozen() -> None:
    ae = PatchAutoencoder(patch_size=4, temporal_patch=4)
    with pytest.raises(ValueError, match="1 \\+ k\\*4"):
        ae.encode(_video(1, 6, 8, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        ae.encode(_video(1, 5, 6, 8))
    with pytest.raises(ValueError, match="\\(B, F, C, H, W\\)"):
        ae.encode(torch.zeros(1, 3, 8, 8))
    parent = torch.nn.Sequential(ae)
    parent.train()
    assert not ae.training
    assert isinstance(ae, Autoencoder)


# ---------------------------------------------------------------------------------------------- SD AutoencoderKL


def _save_tiny_kl(path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
                        scaling_factor=0.18215)
    vae.save_pretrained(path)


def test_kl_autoencoder_load_encode_decode(tmp_path) -> None:
    _save_tiny_kl(tmp_path / "vae")
    ae = KLAutoencoder(tmp_path / "vae", key="model.autoencoder.path", chunk_size=2)
    assert (ae.latent_channels, ae.spatial_factor, ae.temporal_factor) == (4, 2, 1)
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.training
    x = _video(2, 3, 16, 16)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (2, 3, 4, 8, 8)
        # scaled posterior mean, per frame: chunking and batching do not change the result
        ref = ae.vae.encode(x[1, 2:3]).latent_dist.mean * 0.18215
        torch.testing.assert_close(z[1, 2:3], ref, rtol=1e-4, atol=1e-5)
        y = ae.decode(z)
        assert y.shape == x.shape and y.abs().max() <= 1
        assert ae.encode_image(x[:, 0]).shape == (2, 4, 8, 8)
        assert ae.decode_image(z[:, 0]).shape == (2, 3, 16, 16)


def test_kl_autoencoder_missing_dir_names_key(tmp_path) -> None:
    with pytest.raises(PretrainedNotFoundError, match="model.autoencoder.path.*AutoencoderKL"):
        KLAutoencoder(tmp_path / "nope", key="model.autoencoder.path")
    with pytest.raises(PretrainedNotFoundError, match="my.vae.key"):
        KLAutoencoder(None, key="my.vae.key")


# ---------------------------------------------------------------------------------------------- LTX video VAE


@pytest.mark.parametrize("timestep_conditioning", [False, True])
def test_ltx_autoencoder_load_encode_decode(tmp_path, timestep_conditioning: bool) -> None:
    save_tiny_ltx_vae(tmp_path / "ltx_vae", timestep_conditioning)
    ae = LTXVideoAutoencoder(tmp_path / "ltx_vae", key="model.autoencoder.path", decode_timestep=0.05,
                             decode_noise_scale=0.0)
    assert (ae.latent_channels, ae.spatial_factor, ae.temporal_factor) == (8, 32, 8)
    assert ae.timestep_conditioning is timestep_conditioning
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.training
    torch.testing.assert_close(ae.vae.latents_std, torch.linspace(0.5, 2.0, 8))  # buffers survive the round trip
    x = _video(2, 9, 32, 64)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (2, 2, 8, 1, 2)
        # per-channel normalisation as in diffusers' LTXPipeline._normalize_latents, (B, C, T, H, W) layout
        mu = ae.vae.encode(x.permute(0, 2, 1, 3, 4)).latent_dist.mode()
        ref = (mu - ae.vae.latents_mean.view(1, -1, 1, 1, 1)) / ae.vae.latents_std.view(1, -1, 1, 1, 1)
        torch.testing.assert_close(z, ref.permute(0, 2, 1, 3, 4), rtol=1e-4, atol=1e-5)
        y = ae.decode(z)
        assert y.shape == x.shape and y.abs().max() <= 1
        # decode denormalises before calling the VAE
        temb = torch.full((2,), 0.05) if timestep_conditioning else None
        y_ref = ae.vae.decode(mu, temb).sample.permute(0, 2, 1, 3, 4).clamp(-1, 1)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        assert ae.encode_image(x[:, 0]).shape == (2, 8, 1, 2)
        assert ae.decode_image(z[:, 0]).shape == (2, 3, 32, 64)
    with pytest.raises(ValueError, match="1 \\+ k\\*8"):
        ae.encode(_video(1, 8, 32, 32))


def test_ltx_autoencoder_missing_dir_names_key(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedNotFoundError, match="model.dit.vae_path.*config.json.*AutoencoderKLLTXVideo"):
        LTXVideoAutoencoder(tmp_path / "empty", key="model.dit.vae_path")
