"""The MirrorMe family's mechanisms, each checked on the real tiny model (model=mirrorme_tiny through Hydra) and real
synthetic-world batches: causal audio alignment, reference RoPE coordinates, per-token timesteps, the face-masked
audio adapter, the face loss, motion frames, and a two-clip long generation."""

from __future__ import annotations

import hydra
import pytest
import torch

from config_utils import compose_train
from halfbody.data.datamodule import HalfBodyDataModule
from halfbody.mirrorme.audio_adapter import AudioAdapter
from halfbody.mirrorme.causal_audio_encoder import CausalAudioEncoder, causal_frame_groups
from halfbody.mirrorme.face_mask import latent_face_mask, static_face_mask
from halfbody.mirrorme.transformer import token_coordinates, token_timesteps
from halfbody.models.flow_matching import RectifiedFlow, shift_timesteps


def _model(overrides: list[str] | None = None):
    cfg = compose_train(["model=mirrorme_tiny", *(overrides or [])])
    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg.model)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    from data_pipelines.synthetic_world import generate_shards

    root = tmp_path_factory.mktemp("mirrorme_world")
    shards = generate_shards(root, num_clips=2, num_frames=40, resolution=64, workers=0, headshot_fraction=0)
    dm = HalfBodyDataModule([str(p) for p in shards], num_frames=17, resolution=64, batch_size=2, num_workers=0,
                            batches_per_epoch=1, val_samples=2, condition={"pose_groups": "hands"})
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


# ------------------------------------------------------------------------------------------ causal audio encoder
def test_causal_audio_encoder_aligns_each_latent_frame_with_exactly_its_video_frames():
    """Audio latent frame i depends on exactly the video frames of VAE latent frame i (frame 0 alone, then groups of
    8): perturbing frame j's features changes only the latent frame whose group holds j."""
    torch.manual_seed(0)
    enc = CausalAudioEncoder(in_dim=12, model_dim=16, audio_dim=8, num_tokens=2, temporal_factor=8, channels=16)
    torch.nn.init.normal_(enc.to_global.weight)  # zero-initialised: make a_glo informative for the test
    feats = torch.randn(1, 25, 3, 4)
    groups = causal_frame_groups(25, 8)
    assert [(g.start, g.stop) for g in groups] == [(0, 1), (1, 9), (9, 17), (17, 25)]
    a_glo, a_loc = enc(feats)
    assert a_glo.shape == (1, 4, 16) and a_loc.shape == (1, 4, 2, 8)
    for j in range(25):
        bumped = feats.clone()
        bumped[:, j] += 1.0
        g2, l2 = enc(bumped)
        changed = [i for i in range(4) if not torch.allclose(l2[:, i], a_loc[:, i]) or not torch.allclose(g2[:, i], a_glo[:, i])]
        assert changed == [next(i for i, g in enumerate(groups) if j in g)], j
    with pytest.raises(ValueError, match="1 \\+ k\\*8 frames"):
        enc(torch.randn(1, 23, 3, 4))


def test_causal_audio_encoder_reads_the_real_past_before_a_clip():
    """With the 7 frames before the clip in front (a later clip of a long video, a window inside a longer clip),
    latent frame 0 reads them instead of copies of frame 0; the later latent frames do not change, and giving the
    copies as the past is exactly the padded form."""
    torch.manual_seed(0)
    enc = CausalAudioEncoder(in_dim=12, model_dim=16, audio_dim=8, num_tokens=2, temporal_factor=8, channels=16)
    torch.nn.init.normal_(enc.to_global.weight)
    assert enc.past_frames == 7
    clip, past = torch.randn(1, 17, 3, 4), torch.randn(1, 7, 3, 4)
    g0, l0 = enc(clip)
    g1, l1 = enc(torch.cat([past, clip], dim=1))
    assert g1.shape == g0.shape and l1.shape == l0.shape == (1, 3, 2, 8)
    assert torch.allclose(g1[:, 1:], g0[:, 1:]) and torch.allclose(l1[:, 1:], l0[:, 1:])
    assert (l1[:, 0] - l0[:, 0]).abs().max() > 1e-3
    g2, l2 = enc(torch.cat([clip[:, :1].expand(-1, 7, -1, -1), clip], dim=1))
    assert torch.allclose(g2, g0, atol=1e-6) and torch.allclose(l2, l0, atol=1e-6)


# ------------------------------------------------------------------------------------------ reference RoPE
def test_reference_tokens_share_the_video_grid_at_a_large_time_offset():
    coords = token_coordinates(2, latent_frames=3, height=2, width=3, fps=25.0, spatial_factor=32, temporal_factor=8,
                               reference_time_offset=20.0)
    assert coords.shape == (2, 3, 6 + 3 * 6)
    ref, video = coords[0, :, :6], coords[0, :, 6:].reshape(3, 3, 6)
    assert torch.all(ref[0] == 20.0)  # the reference's time
    for f in range(3):  # spatially aligned with every video frame
        assert torch.equal(ref[1:], video[1:, f])
    # video time: the first pixel frame of each latent frame (0, 1, 9) over fps (LTX's causal convention)
    assert torch.allclose(video[0, :, 0], torch.tensor([0.0, 1 / 25, 9 / 25]))
    assert torch.equal(ref[2, :3], torch.tensor([0.0, 32.0, 64.0]))  # pixel x of the latent columns
    with pytest.raises(ValueError, match="reference_time_offset"):  # inside the clip
        token_coordinates(1, 3, 2, 3, fps=25.0, spatial_factor=32, temporal_factor=8, reference_time_offset=0.2)
    with pytest.raises(ValueError, match="wraps"):  # beyond what the slowest RoPE frequency represents
        token_coordinates(1, 3, 2, 3, fps=25.0, spatial_factor=32, temporal_factor=8, reference_time_offset=45.0)


# ------------------------------------------------------------------------------------------ per-token timesteps
def test_reference_and_motion_frames_are_clean_tokens(batch):
    model = _model()
    t_tok = token_timesteps(torch.tensor([0.7, 0.3]), num_reference_tokens=4, latent_frames=3, tokens_per_frame=4,
                            clean_latent_frames=1)
    assert torch.equal(t_tok[0], torch.tensor([0.0] * 4 + [0.0] * 4 + [0.7] * 8))
    assert torch.equal(t_tok[1], torch.tensor([0.0] * 4 + [0.0] * 4 + [0.3] * 8))
    # through the real network: what reaches LTX's timestep embedding (LTX's 1000 t convention)
    seen = []
    time_embed = model.network.transformer.time_embed
    hook = time_embed.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(args[0].clone()),
                                                with_kwargs=True)
    with torch.no_grad():
        x0 = model.autoencoder.encode(batch["video"])
        ref = model.autoencoder.encode_image(batch["ref"])
        _, tokens = model.network(x0, torch.tensor([0.9, 0.5]), ref, None, fps=25.0, clean_latent_frames=1,
                                  return_token_timesteps=True)
    hook.remove()
    hw = x0.shape[-2] * x0.shape[-1]
    assert tokens.shape == (2, hw * (1 + x0.shape[1]))
    assert torch.all(tokens[:, : 2 * hw] == 0)  # the reference, then the motion frame
    assert torch.all(tokens[0, 2 * hw:] == 0.9) and torch.all(tokens[1, 2 * hw:] == 0.5)
    assert torch.allclose(seen[0], (tokens * 1000).flatten())


# ------------------------------------------------------------------------------------------ face-masked audio
def test_audio_adapter_cannot_change_tokens_outside_the_face_mask():
    torch.manual_seed(0)
    adapter = AudioAdapter(query_dim=16, audio_dim=8, heads=2, head_dim=8, gamma_init=1.0)
    hidden = torch.randn(2, 3, 10, 16)
    face = torch.zeros(2, 3, 10)
    face[:, :, :4] = 1
    out1 = adapter(hidden, torch.randn(2, 3, 5, 8), face)
    out2 = adapter(hidden, torch.randn(2, 3, 5, 8), face)
    outside, inside = face == 0, face == 1
    assert torch.allclose(out1[outside], out2[outside], atol=1e-6)  # they only ever see the padding token
    assert (out1[inside] - out2[inside]).abs().max() > 1e-3
    # CFG's unconditional branch: no audio anywhere for a dropped clip
    keep = torch.tensor([1.0, 0.0])
    a, b = adapter(hidden, torch.randn(2, 3, 5, 8), None, keep), adapter(hidden, torch.randn(2, 3, 5, 8), None, keep)
    assert torch.allclose(a[1], b[1], atol=1e-6) and (a[0] - b[0]).abs().max() > 1e-3


def _conditioned(model, batch):
    with torch.no_grad():
        x0 = model.autoencoder.encode(batch["video"])
        ref = model.autoencoder.encode_image(batch["ref"])
        feats = model.audio_features(batch)
    return x0, ref, feats


def _wake(model):
    """Give the zero-initialised audio and pose paths weights, as training would."""
    with torch.no_grad():
        for a in model.network.audio_adapters:
            a.gamma.fill_(1.0)
        torch.nn.init.normal_(model.network.audio_encoder.to_global.weight, std=0.5)
        torch.nn.init.normal_(model.network.hand_pose_encoder.proj.weight, std=0.5)


def test_audio_reaches_the_network_only_through_the_face(batch):
    """With a face mask, audio enters only face tokens (a_glo and the adapters); with no face, audio cannot change
    the prediction at all."""
    model = _model()
    _wake(model)
    x0, ref, feats = _conditioned(model, batch)
    t = torch.tensor([0.5, 0.5])
    run = lambda f, mask: model.network(x0, t, ref, f, fps=25.0, face_mask=mask)  # noqa: E731
    no_face = torch.zeros(x0.shape[0], x0.shape[1], *x0.shape[-2:])
    with torch.no_grad():
        assert torch.allclose(run(feats, no_face), run(feats.flip(0), no_face), atol=1e-5)
        face = no_face.clone()
        face[..., 2:5, 3:5] = 1
        assert (run(feats, face) - run(feats.flip(0), face)).abs().max() > 1e-3


def test_cfg_branches_share_one_batch_and_the_unconditional_one_ignores_every_condition(batch):
    """The batched CFG call: its conditional half equals a conditional-only pass; its unconditional half (reference,
    audio and pose zeroed, adapters on the padding token) does not change when the conditions do."""
    model = _model()
    _wake(model)
    net = model.network
    x0, ref, feats = _conditioned(model, batch)
    pose, b = batch["pose"], x0.shape[0]
    t = torch.tensor([0.6, 0.6])
    keep = torch.tensor([True] * b + [False] * b)
    twice = lambda v: torch.cat([v, v])  # noqa: E731

    def cfg_pass(ref_, feats_, pose_):
        cond = net.encode_conditions(twice(feats_), twice(pose_), audio_keep=keep, pose_keep=keep)
        return net(twice(x0), twice(t), twice(ref_), None, fps=25.0, ref_keep=keep, audio_keep=keep,
                   conditions=cond).chunk(2)

    with torch.no_grad():
        v_cond, v_uncond = cfg_pass(ref, feats, pose)
        assert torch.allclose(v_cond, net(x0, t, ref, feats, pose, fps=25.0), atol=1e-5)
        v_cond2, v_uncond2 = cfg_pass(ref.flip(0), feats.flip(0), pose.flip(0))
    assert torch.allclose(v_uncond, v_uncond2, atol=1e-5)
    assert (v_cond - v_cond2).abs().max() > 1e-3


def test_dynamic_and_enlarged_static_face_masks():
    mask = torch.zeros(1, 9, 1, 64, 64)
    mask[0, 0, 0, 8:16, 8:16] = 1  # frame 0: the causal first latent frame alone
    mask[0, 5, 0, 40:48, 40:48] = 1  # a frame of the second latent frame
    lat = latent_face_mask(mask, spatial_factor=8, temporal_factor=8)
    assert lat.shape == (1, 2, 8, 8)
    assert lat[0, 0].nonzero().tolist() == [[1, 1]] and lat[0, 1].nonzero().tolist() == [[5, 5]]
    static = static_face_mask(mask, enlarge=1.5)
    assert torch.equal(static[0, 0], static[0, 8])  # one mask for every frame
    ys, xs = static[0, 0, 0].nonzero(as_tuple=True)
    # the box 8..48 (centre 28, half-size 20) scaled 1.5x: 28 -+ 30, clipped to the frame
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (0, 58, 0, 58)


# ------------------------------------------------------------------------------------------ losses
def test_face_loss_is_the_velocity_error_inside_the_face_mask(batch):
    model = _model(["model.motion_frames.probability=0"])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    _, logs = model.diffusion_loss(batch, generator=g())
    assert "face" in logs and logs["face"] != logs["mse"]
    full = dict(batch, mask_face=torch.ones_like(batch["mask_face"]))  # face = whole valid frame: L_face = L_MSE
    loss, logs_full = model.diffusion_loss(full, generator=g())
    assert torch.allclose(logs_full["face"], logs_full["mse"]) and torch.allclose(loss, 2 * logs_full["mse"])
    model.face_loss_weight = 0.0
    loss0, logs0 = model.diffusion_loss(batch, generator=g())
    assert "face" not in logs0 and torch.allclose(loss0, logs["mse"])
    # a prediction that is exact inside the face and wrong outside: L_face = 0, L_MSE > 0
    model.face_loss_weight = 1.0
    model.flow.prediction_type = "v_prediction"  # the stand-in network below outputs the velocity itself
    target = {}
    velocity_target = model.flow.velocity_target
    model.flow.velocity_target = lambda *a: target.setdefault("v", velocity_target(*a))
    face = latent_face_mask(batch["mask_face"], *model.factors)[:, :, None]  # (B, F', 1, h, w)
    model.network.forward = lambda *a, **k: target["v"] + 3.0 * (1 - face)
    _, logs_out = model.diffusion_loss(batch, generator=g())
    assert logs_out["face"] == 0 and logs_out["mse"] > 1


def test_motion_frames_are_clean_ground_truth_and_outside_the_loss(batch):
    model = _model(["model.motion_frames.probability=1", "model.motion_frames.max_latent_frames=1"])
    seen = {}
    forward = model.network.forward

    def spy(noisy, t, ref, feats, pose=None, **kw):
        seen.update(noisy=noisy.detach().clone(), clean=kw["clean_latent_frames"])
        out = forward(noisy, t, ref, feats, pose, **kw)
        return torch.cat([out[:, :1] + 1e3, out[:, 1:]], dim=1)  # a wild prediction on the motion frame

    model.network.forward = spy
    loss, logs = model.diffusion_loss(batch, generator=torch.Generator().manual_seed(0))
    x0 = model.autoencoder.encode(batch["video"])
    assert seen["clean"] == 1 and logs["motion_frames"] == 1
    assert torch.equal(seen["noisy"][:, :1], x0[:, :1])  # replaced by the clean ground truth
    assert not torch.allclose(seen["noisy"][:, 1:], x0[:, 1:])  # the rest is noisy
    assert loss < 100  # the +1e3 on the motion frame never reaches the loss


def test_rectified_flow_shift_and_targets():
    flow = RectifiedFlow(shift=17.0)
    t = flow.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert 0 <= t.min() and t.max() < 1 and (t > 0.5).float().mean() > 0.9  # shift 17 favours high noise
    assert torch.allclose(shift_timesteps(torch.tensor([0.0, 0.5, 1.0]), 17.0), torch.tensor([0.0, 17 / 18, 1.0]))
    x0, eps, tt = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([0.25, 0.75])
    xt = flow.add_noise(x0, eps, tt)
    assert torch.allclose(flow.predict_x0(xt, flow.velocity_target(x0, eps), tt), x0, atol=1e-6)
    # the sampling grid: the preset's sample shift 3 keeps every one of the 15 Euler steps short; the training
    # shift 17 would jump from t = 0.55 straight to data in the last step
    assert float((RectifiedFlow(17.0, sample_shift=3.0).sigmas(15).diff().abs()).max()) < 0.3
    assert float(RectifiedFlow(17.0).sigmas(15)[-2]) > 0.5
    # an exact velocity field carries noise to the data point in any number of Euler steps
    out = flow.euler_sample(lambda x, t_, u: eps - x0, (2, 3, 4), num_steps=3, guidance_scale=1.0, latents=eps)
    assert torch.allclose(out, x0, atol=1e-5)


# ------------------------------------------------------------------------------------------ long generation
def test_two_clip_generation_is_continuous_in_audio_and_time(batch):
    model = _model(["model.num_inference_steps=2", "model.motion_frames.max_latent_frames=2"]).eval()
    clips, feats_seen = [], []
    decode, encode_conditions = model.autoencoder.decode, model.network.encode_conditions
    model.autoencoder.decode = lambda z: clips.append(decode(z)) or clips[-1]
    model.network.encode_conditions = lambda feats, *a, **k: feats_seen.append(feats) or encode_conditions(feats, *a, **k)

    b, f = batch["video"].shape[:2]  # 17-frame clips: 3 latent frames, 2 of them motion frames -> 9 frames overlap
    audio = batch["audio"]
    out = model.generate_long(batch["ref"], audio, fps=25.0, num_frames=25, clip_frames=17, motion_latent_frames=2,
                              pose=batch["pose"], face_mask=batch["mask_face"],
                              generator=torch.Generator().manual_seed(0))
    video = out["video"]
    assert out["clips"] == [(0, 17), (8, 25)] and video.shape == (b, 25, 3, 64, 64)
    first, second = clips
    # time: the second clip opens on exactly the frames the first one ended with (its clean motion frames)
    assert torch.allclose(second[:, :9], first[:, 8:], atol=1e-5)
    assert torch.allclose(video[:, :17], first) and torch.allclose(video[:, 17:], second[:, 9:])
    # audio: one feature sequence over the whole audio, each clip fed its frames' slice preceded by the 7 frames of
    # real audio before it (the causal encoder's first group), not copies of its first frame
    assert out["audio_past"] == 7
    padded = torch.nn.functional.pad(audio, (0, 16000 - audio.shape[1]))
    whole = model.audio_encoder(padded, num_frames=25, fps=25.0)
    assert torch.allclose(out["audio_feats"][:, 7:], whole, atol=1e-5)
    conditional = [f[:b] for f in feats_seen]  # per clip, the CFG batch: conditional half first
    assert len(conditional) == 2 and conditional[0].shape[1] == conditional[1].shape[1] == 7 + 17
    assert torch.allclose(conditional[0][:, 7:], whole[:, 0:17], atol=1e-5)
    assert torch.allclose(conditional[1], whole[:, 1:25], atol=1e-5)  # frames 1..7 (the past), then 8..24
    assert not torch.allclose(conditional[1][:, :7], whole[:, 8:9].expand(-1, 7, -1, -1), atol=1e-3)
    # the wrapper, the pipeline and the long-video call of `generate` are the same sampling
    again = model.pipeline.generate_long(batch["ref"], audio, 25.0, 25, clip_frames=17, motion_latent_frames=2,
                                         pose=batch["pose"], face_mask=batch["mask_face"],
                                         audio_region=model.audio_region, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(again["video"], video, atol=1e-5)


def test_training_windows_hear_the_same_past_audio_as_a_later_clip(batch):
    """A training window's features come from its audio context, preceded by the 7 frames before the window: the
    rows a long video's later clip would get for the same frames."""
    model = _model()
    fps = 25.0
    feats = model.audio_features(batch)
    b, f = batch["video"].shape[:2]
    assert feats.shape[:2] == (b, 7 + f)
    for i in range(b):
        ctx = batch["audio_context"][i:i + 1, :int(batch["audio_context_length"][i])]
        off = int(batch["audio_context_offset"][i])
        first = round(off / 16000 * fps)  # the window's first frame in the context
        total = round(ctx.shape[1] / 16000 * fps)
        whole = model.pipeline.whole_audio_features(ctx, fps, total, past=7)  # row 7 + j: frame j
        assert torch.allclose(feats[i:i + 1], whole[:, first:first + 7 + f], atol=1e-5), i


def test_generate_paints_the_batchs_padding(batch):
    """The loss never sees padding (``valid`` 0), so the network draws anything there; ``generate(batch)`` returns the
    batch's frame geometry: padding set to ``pad_value``, every valid pixel as sampled."""
    model = _model().eval()
    run = lambda b: model.generate(b, num_inference_steps=1, generator=torch.Generator().manual_seed(0))  # noqa: E731
    valid = batch["valid"].clone()
    valid[..., :, :24] = 0  # a letterbox on the left
    plain = run({k: v for k, v in batch.items() if k != "pad_value"})
    out = run({**batch, "valid": valid, "pad_value": torch.full((2,), 0.25)})
    assert (plain[..., :24] - 0.25).abs().max() > 0.1  # what the network drew there
    assert torch.all(out[..., :24] == 0.25) and torch.equal(out[..., 24:], plain[..., 24:])
