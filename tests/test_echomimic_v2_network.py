"""EchoMimicV2 network (paper Figure 2): shapes, conditions, module groups, pretrained loading, save/load."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from halfbody.echomimic_v2 import AudioCrossAttnProcessor, AttentionContext, EchoMimicV2Network, tiny_unet_config
from halfbody.echomimic_v2.attention_processors import region_tokens_by_length, token_grids
from halfbody.echomimic_v2.network import GROUP_NAMES
from halfbody.models.pretrained import PretrainedNotFoundError

D, K, C, FACTOR = 32, 5, 48, 4  # audio dim / tokens, latent channels, latent factor (patch AE)


def make_net(**kwargs) -> EchoMimicV2Network:
    torch.manual_seed(0)
    return EchoMimicV2Network.tiny(latent_channels=C, latent_factor=FACTOR, audio_dim=D, audio_tokens=K, **kwargs)


def make_inputs(b: int = 2, f: int = 4, seed: int = 1, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        noisy_latents=torch.randn(b, f, C, size, size, generator=g),
        timesteps=torch.randint(0, 1000, (b,), generator=g),
        ref_latents=torch.randn(b, C, size, size, generator=g),
        audio_feats=torch.randn(b, f, K, D, generator=g),
        pose=torch.rand(b, f, 3, size * FACTOR, size * FACTOR, generator=g),
    )


def wake_zero_inits(net: EchoMimicV2Network) -> None:
    """Give the zero-initialised outputs (pose encoder, temporal modules) non-zero weights, as after training."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        net.pose_encoder.conv_out.weight.copy_(torch.randn(net.pose_encoder.conv_out.weight.shape, generator=g) * 0.05)
        for m in net.module_groups()["temporal"]:
            m.proj_out.weight.copy_(torch.randn(m.proj_out.weight.shape, generator=g) * 0.05)


def group_params(net: EchoMimicV2Network) -> dict[str, set[int]]:
    return {k: {id(p) for m in mods for p in m.parameters()} for k, mods in net.module_groups().items()}


@torch.no_grad()
def run(net, **kw) -> torch.Tensor:
    return net(**kw)


def test_tiny_forward_backward_shapes_and_gradients():
    net = make_net()
    wake_zero_inits(net)
    inp = make_inputs(b=2, f=8)
    out = net(**inp, audio_mode="global")
    assert out.shape == (2, 8, C, 16, 16)
    out.square().mean().backward()
    groups = group_params(net)
    for name, ids in groups.items():
        grads = [p.grad for p in net.parameters() if id(p) in ids]
        assert all(g is not None for g in grads), f"group {name} has parameters without gradient"
        assert any(g.abs().sum() > 0 for g in grads), f"no gradient reaches group {name}"


def test_tiny_unet_width_is_configurable():
    """``model.network.block_out_channels`` widens both UNets and the pose encoder's output; the output keeps its shape."""
    net = make_net(block_out_channels=(16, 32))
    assert tuple(net.denoising_unet.unet.config.block_out_channels) == (16, 32)
    assert tuple(net.reference_net.unet.config.block_out_channels) == (16, 32)
    assert net.denoising_unet.unet.conv_in.out_channels == 16
    assert run(net, **make_inputs(b=1, f=2)).shape == (1, 2, C, 16, 16)


def test_fresh_temporal_modules_are_identity():
    net = make_net()
    image_net = make_net(temporal=False)
    missing, unexpected = image_net.load_state_dict(net.state_dict(), strict=False)
    assert not missing and all(".motion_modules." in k for k in unexpected) and unexpected
    inp = make_inputs()
    assert torch.equal(run(net, **inp), run(image_net, **inp))
    # Frames are independent for a fresh network: changing frame 0 leaves frame 1..F-1 unchanged ...
    inp2 = dict(inp, noisy_latents=inp["noisy_latents"].clone())
    inp2["noisy_latents"][:, 0] += 1.0
    a, b = run(net, **inp), run(net, **inp2)
    assert not torch.allclose(a[:, 0], b[:, 0])
    assert torch.equal(a[:, 1:], b[:, 1:])
    # ... and once the temporal output projections are non-zero, frames talk to each other.
    wake_zero_inits(net)
    a, b = run(net, **inp), run(net, **inp2)
    assert not torch.allclose(a[:, 1:], b[:, 1:])


def test_reference_bank_and_ref_keep():
    net = make_net()
    inp = make_inputs()
    other_ref = dict(inp, ref_latents=torch.randn_like(inp["ref_latents"]))
    a, b = run(net, **inp), run(net, **other_ref)
    assert not torch.allclose(a, b, atol=1e-4)  # the reference changes the output
    keep = torch.tensor([True, False])
    a, b = run(net, **inp, ref_keep=keep), run(net, **other_ref, ref_keep=keep)
    assert not torch.allclose(a[0], b[0], atol=1e-4)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)  # dropped: no reference influence
    # A kept sample is unaffected by another sample's dropout.
    torch.testing.assert_close(a[0], run(net, **inp)[0], rtol=1e-5, atol=1e-6)
    # A precomputed bank (reused across sampling steps) gives the same prediction.
    with torch.no_grad():
        bank = net.encode_reference(inp["ref_latents"])
    torch.testing.assert_close(run(net, **inp, reference_bank=bank), run(net, **inp), rtol=1e-5, atol=1e-6)


def test_audio_modes_and_audio_keep():
    net = make_net()
    inp = make_inputs()
    other_audio = dict(inp, audio_feats=torch.randn_like(inp["audio_feats"]))
    b, f = 2, 4
    # "off": audio is ignored (and may be absent).
    off = run(net, **inp, audio_mode="off")
    assert torch.equal(off, run(net, **other_audio, audio_mode="off"))
    assert torch.equal(off, run(net, **dict(inp, audio_feats=None), audio_mode="off"))
    # "global": audio matters.
    glob = run(net, **inp, audio_mode="global")
    assert not torch.allclose(glob, run(net, **other_audio, audio_mode="global"), atol=1e-4)
    # "masked": an empty mask is "off", a full mask is "global".
    zeros, ones = torch.zeros(b, f, 1, 64, 64), torch.ones(b, f, 1, 64, 64)
    assert torch.equal(run(net, **inp, audio_mode="masked", audio_mask=zeros), off)
    assert torch.equal(run(net, **other_audio, audio_mode="masked", audio_mask=zeros), off)
    assert torch.equal(run(net, **inp, audio_mode="masked", audio_mask=ones), glob)
    # A lips-like region: audio matters, but differently from global.
    lips = zeros.clone()
    lips[..., 36:48, 24:40] = 1.0
    masked = run(net, **inp, audio_mode="masked", audio_mask=lips)
    assert not torch.allclose(masked, run(net, **other_audio, audio_mode="masked", audio_mask=lips), atol=1e-4)
    assert not torch.allclose(masked, glob, atol=1e-4)
    with pytest.raises(ValueError, match="audio_mask"):
        net(**inp, audio_mode="masked")
    with pytest.raises(ValueError, match="audio_mode"):
        net(**inp, audio_mode="lips")
    # audio_keep: as released, a dropped sample hears zero audio tokens (not "off": attn2's output bias remains);
    # kept samples are "global".
    keep = torch.tensor([1.0, 0.0])
    a = run(net, **inp, audio_keep=keep)
    silent = inp["audio_feats"].clone()
    silent[1] = 0
    torch.testing.assert_close(a[1], run(net, **dict(inp, audio_feats=silent))[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[1], off[1], atol=1e-4)
    torch.testing.assert_close(a[0], glob[0], rtol=1e-5, atol=1e-6)
    # The projection ablation zeroes the dropped sample's audio attention: it behaves as "off".
    proj = make_net(audio_attention="projection")
    a, off = run(proj, **inp, audio_keep=keep), run(proj, **inp, audio_mode="off")
    torch.testing.assert_close(a[1], off[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[0], off[0], atol=1e-4)


def test_partial_attention_is_zero_outside_the_region():
    """§3.2.2 Lips Partial Attention: the audio cross-attention output vanishes outside the (resized) mask."""
    net = make_net()
    blk = net.denoising_unet.transformer_blocks()[0]  # 16x16 grid, 32 channels
    b, f = 1, 2
    mask = torch.zeros(b, f, 1, 64, 64)
    mask[..., 0:8, 0:8] = 1.0  # top-left 2x2 latent pixels
    ctx = AttentionContext(num_frames=f, audio_mode="masked",
                           audio_region=region_tokens_by_length(mask, token_grids(16, 16, 2)))
    hidden = torch.randn(b * f, 256, 32)
    audio = torch.randn(b * f, K, D)
    out = AudioCrossAttnProcessor()(blk.attn2, hidden, audio, attn_context=ctx).view(b * f, 16, 16, 32)
    assert out[:, :2, :2].abs().sum() > 0
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[:2, :2] = True
    assert out[:, ~inside].abs().sum() == 0
    # The 8x8 level max-pools: the region survives as one token.
    assert ctx.audio_region[64].view(b * f, 8, 8)[0].sum() == 1


def test_pose_encoder_and_pose_keep():
    net = make_net()
    inp = make_inputs()
    no_pose = run(net, **dict(inp, pose=None))
    assert torch.equal(run(net, **inp), no_pose)  # zero-initialised output conv: no influence yet
    wake_zero_inits(net)
    no_pose = run(net, **dict(inp, pose=None))
    with_pose = run(net, **inp)
    assert not torch.allclose(with_pose, no_pose, atol=1e-4)
    assert not torch.allclose(with_pose, run(net, **dict(inp, pose=torch.zeros_like(inp["pose"]))), atol=1e-4)
    a = run(net, **inp, pose_keep=torch.tensor([True, False]))
    torch.testing.assert_close(a[1], no_pose[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[0], with_pose[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pose"):
        net(**dict(inp, pose=torch.rand(2, 4, 3, 32, 32)))


def test_module_groups_partition_and_unused_parameters():
    net = make_net()
    groups = group_params(net)
    assert tuple(groups) == GROUP_NAMES
    all_ids = [id(p) for p in net.parameters()]
    for name, ids in groups.items():
        assert ids, f"group {name} is empty"
    counted = [i for ids in groups.values() for i in ids]
    assert sorted(counted) == sorted(all_ids), "every parameter must be in exactly one group"
    # DDP: with audio "off", exactly the audio_attention group is unused; otherwise nothing is.
    inp = make_inputs(b=1, f=2)
    net(**inp, audio_mode="off").mean().backward()
    unused = {id(p) for p in net.parameters() if p.grad is None}
    assert unused == groups["audio_attention"]
    net.zero_grad(set_to_none=True)
    net(**inp, audio_mode="masked", audio_mask=torch.zeros(1, 2, 1, 64, 64),
        ref_keep=torch.tensor([False]), audio_keep=torch.tensor([0.0]), pose_keep=torch.tensor([0.0])).mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_gradient_checkpointing_matches():
    net = make_net()
    wake_zero_inits(net)
    inp = make_inputs(b=2, f=2)
    kw = dict(audio_mode="masked", audio_mask=torch.ones(2, 2, 1, 64, 64), ref_keep=torch.tensor([True, False]))

    def grads():
        net.zero_grad(set_to_none=True)
        out = net(**inp, **kw)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    out_a, g_a = grads()
    net.enable_gradient_checkpointing()
    out_b, g_b = grads()
    net.disable_gradient_checkpointing()
    torch.testing.assert_close(out_a, out_b)
    for x, y in zip(g_a, g_b):
        torch.testing.assert_close(x, y)


def test_from_pretrained_parts_loads_a_saved_unet(tmp_path):
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**tiny_unet_config(C))
    unet.save_pretrained(tmp_path / "unet")
    net = EchoMimicV2Network.from_pretrained_parts(
        tmp_path / "unet", audio_dim=D, audio_tokens=K, latent_factor=FACTOR, latent_channels=C,
        pose_block_out_channels=(8, 16, 32), temporal_num_attention_heads=4)
    ref_unet, den_unet = net.reference_net.unet, net.denoising_unet.unet
    w = unet.down_blocks[0].resnets[0].conv1.weight
    assert torch.equal(ref_unet.down_blocks[0].resnets[0].conv1.weight, w)
    assert torch.equal(den_unet.down_blocks[0].resnets[0].conv1.weight, w)
    assert torch.equal(den_unet.conv_in.weight, unet.conv_in.weight)
    attn = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    sd = unet.state_dict()
    assert torch.equal(dict(ref_unet.named_parameters())[attn], sd[attn])
    assert torch.equal(dict(den_unet.named_parameters())[attn], sd[attn])
    # As released: attn2's queries/output come from the base UNet, its keys/values take the audio features (D wide)
    # and start fresh; the ReferenceNet has no cross-attention.
    q2, k2 = attn.replace("attn1.to_q", "attn2.to_q"), attn.replace("attn1.to_q", "attn2.to_k")
    assert torch.equal(den_unet.state_dict()[q2], sd[q2])
    assert den_unet.state_dict()[k2].shape == (sd[k2].shape[0], D) != sd[k2].shape
    assert not any(".attn2." in k for k in ref_unet.state_dict())
    # Two independent copies: the ReferenceNet does not share storage with the denoiser.
    assert (ref_unet.down_blocks[0].resnets[0].conv1.weight.data_ptr()
            != den_unet.down_blocks[0].resnets[0].conv1.weight.data_ptr())
    out = run(net, **make_inputs(b=1, f=2))
    assert out.shape == (1, 2, C, 16, 16)

    # temporal_dir round trip.
    wake_zero_inits(net)
    net.save_temporal(tmp_path / "motion")
    net2 = EchoMimicV2Network.from_pretrained_parts(
        tmp_path / "unet", audio_dim=D, audio_tokens=K, latent_factor=FACTOR, temporal_dir=tmp_path / "motion",
        pose_block_out_channels=(8, 16, 32), temporal_num_attention_heads=4)
    t1, t2 = net.module_groups()["temporal"], net2.module_groups()["temporal"]
    assert all(torch.equal(a.proj_out.weight, b.proj_out.weight) for a, b in zip(t1, t2))


def test_missing_pretrained_dirs_name_the_key(tmp_path):
    with pytest.raises(PretrainedNotFoundError, match="model.network.unet_dir"):
        EchoMimicV2Network.from_pretrained_parts(tmp_path / "nope", audio_dim=D, audio_tokens=K)
    with pytest.raises(PretrainedNotFoundError, match="model.network.unet_dir"):
        EchoMimicV2Network.from_pretrained_parts(None, audio_dim=D, audio_tokens=K)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedNotFoundError, match="stage.unet_dir"):
        EchoMimicV2Network.from_pretrained_parts(tmp_path / "empty", audio_dim=D, audio_tokens=K, key_prefix="stage")
    with pytest.raises(PretrainedNotFoundError, match="model.network.pretrained_dir"):
        EchoMimicV2Network.from_pretrained(tmp_path / "empty")


def test_save_load_round_trip(tmp_path):
    net = make_net()
    wake_zero_inits(net)
    net.save_pretrained(tmp_path / "net")
    assert (tmp_path / "net" / "model.safetensors").exists()
    loaded = EchoMimicV2Network.from_pretrained(tmp_path / "net")
    inp = make_inputs()
    kw = dict(audio_mode="masked", audio_mask=torch.ones(2, 4, 1, 64, 64), ref_keep=torch.tensor([True, False]))
    assert torch.equal(run(net, **inp, **kw), run(loaded, **inp, **kw))


def test_release_audio_gain_and_frame_position_limit():
    """attn2's output is scaled by the release's 3.0 (audio_feature_ratio); frame positions cover 32 frames."""
    from halfbody.echomimic_v2.temporal_module import FramePositionEncoding

    net = make_net()
    assert net.config["audio_gain"] == 3.0
    blk = net.denoising_unet.transformer_blocks()[0]
    assert blk.attn2.to_k.in_features == D  # the audio features are attn2's keys/values
    hidden, audio = torch.randn(2, 256, 32), torch.randn(2, K, D)
    with torch.no_grad():
        torch.testing.assert_close(blk.attn2.processor(blk.attn2, hidden, audio),
                                   3.0 * AudioCrossAttnProcessor(gain=1.0)(blk.attn2, hidden, audio))
    pe = FramePositionEncoding(8, max_frames=32)
    assert "pe" in pe.state_dict() and pe(torch.zeros(1, 32, 8)).shape == (1, 32, 8)
    with pytest.raises(ValueError, match="33 frames.*covers 32"):
        pe(torch.zeros(1, 33, 8))
