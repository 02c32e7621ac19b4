"""Oracle metrics: they separate ground truth from broken videos, at full and at 64x64 resolution, on
numpy uint8 and torch [-1, 1] inputs alike."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipelines.synthetic_world import WorldConfig, render_clip
from halfbody.metrics import oracle

FPS = 25.0
CFG = WorldConfig(seed=1, num_identities=4, num_frames=75, fps=FPS)


@pytest.fixture(scope="module")
def clips():
    # 0 and 4 share an identity (index % 4) with different motion; 1 is another identity
    return {i: render_clip(CFG, i, kind="halfbody") for i in (0, 1, 4)} | {"head": render_clip(CFG, 2, kind="headshot")}


def _torch(frames: np.ndarray, size: int | None = None) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (F, 3, H, W) in [-1, 1], optionally downscaled (antialiased bilinear)."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if size is not None:
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t


def _view(clip, res):
    """(frames, reference) as uint8 numpy at full resolution, or as torch [-1, 1] at 64x64."""
    if res == "full":
        return clip.frames, clip.reference
    return _torch(clip.frames, 64), _torch(clip.reference[None], 64)[0]


RES = ["full", "64"]


def test_audio_envelope_is_per_frame_rms():
    t = np.arange(32000) / 16000
    audio = np.where(t < 1.0, 0.5 * np.sin(2 * np.pi * 200 * t), 0.0)
    env = oracle.audio_envelope(audio, FPS, 50)
    assert env.shape == (50,)
    np.testing.assert_allclose(env[2:23], 0.5 / math.sqrt(2), rtol=1e-2)
    np.testing.assert_allclose(env[27:], 0.0, atol=1e-9)
    assert 0.1 < env[25] < 0.3  # the frame at t = 1 s straddles the end of the tone
    assert oracle.audio_envelope(torch.from_numpy(audio).float()[None], FPS, 50).shape == (50,)


@pytest.mark.parametrize("res", RES)
def test_mouth_sync_high_for_ground_truth_low_for_other_audio(clips, res):
    a, b = clips[0], clips[1]
    frames, _ = _view(a, res)
    gt = oracle.mouth_sync(frames, a.kpts, a.audio, FPS)
    assert gt["sync"] > 0.9 and gt["control"] < 0.4 and gt["sync_minus_control"] > 0.6, gt
    wrong = oracle.mouth_sync(frames, a.kpts, b.audio, FPS)
    assert wrong["sync"] < 0.4 and gt["sync"] - wrong["sync"] > 0.5, wrong
    # a frozen mouth carries no sync at all
    frozen = frames[:1].repeat(len(a.kpts), 1, 1, 1) if isinstance(frames, torch.Tensor) else np.repeat(frames[:1], len(a.kpts), 0)
    assert oracle.mouth_sync(frozen, a.kpts, a.audio, FPS)["sync"] == 0.0
    # the headshot too
    h = clips["head"]
    hf, _ = _view(h, res)
    assert oracle.mouth_sync(hf, h.kpts, h.audio, FPS)["sync"] > 0.9


def test_mouth_opening_needs_visible_lips(clips):
    a = clips[0]
    k = a.kpts[:3].copy()
    k[1, 71:91, 2] = 0
    op = oracle.mouth_opening(a.frames[:3], k)
    assert np.isfinite(op[[0, 2]]).all() and np.isnan(op[1])
    short = oracle.mouth_sync(a.frames[:4], a.kpts[:4], a.audio, FPS)
    assert all(math.isnan(v) for v in short.values()), "too few frames for a correlation"
    assert oracle.pearson([1, 1, 1, 1], [1, 2, 3, 4]) == 0.0
    assert oracle.pearson([1, 2, 3, 5], [2, 4, 6, 10]) == pytest.approx(1.0)


@pytest.mark.parametrize("res", RES)
def test_hand_error_small_for_ground_truth_large_for_moved_or_swapped_hands(clips, res):
    a, same_identity = clips[0], clips[4]
    frames, ref = _view(a, res)
    colors = oracle.glove_colors_from_reference(ref)
    pal = a.identity
    for side in ("left", "right"):  # the reference yields the palette's glove colours, sides right
        assert np.linalg.norm(np.subtract(colors[side], getattr(pal, f"glove_{side}"))) < 0.1
    gt = oracle.hand_placement(frames, a.kpts, reference=ref)
    assert gt["hand_error"] < 0.025 and gt["hand_detect_rate"] == 1.0 and gt["hand_count"] == 2 * 75, gt
    # hands moved: keypoints displaced by 0.1 -> error ~0.1
    shifted = a.kpts.copy()
    shifted[:, 91:133, 1] -= 0.1
    moved = oracle.hand_placement(frames, shifted, reference=ref)
    assert 0.08 < moved["hand_error"] < 0.12, moved
    # the same person's frames driven by another clip's hand keypoints
    other_motion = oracle.hand_placement(frames, same_identity.kpts, reference=ref)
    assert other_motion["hand_error"] > 4 * gt["hand_error"], other_motion
    # hands swapped: mirrored frames put each glove on the other side
    flipped = torch.flip(frames, dims=[-1]) if isinstance(frames, torch.Tensor) else frames[:, :, ::-1]
    swapped = oracle.hand_placement(flipped, a.kpts, reference=ref)
    assert swapped["hand_error"] > 0.15, swapped
    # pure noise: glove-like pixels everywhere, centroids near the frame centre
    noise = np.random.default_rng(0).random(oracle.as_frames(frames).shape, dtype=np.float32)
    assert oracle.hand_placement(noise, a.kpts, reference=ref)["hand_error"] > 0.1
    # gloves gone (painted over with the background): every driven hand costs the missing-hand error
    x = oracle.as_frames(frames).copy()
    gone = np.zeros(x.shape[:3], bool)
    for c in colors.values():
        gone |= np.linalg.norm(x - np.asarray(c, np.float32), axis=-1) < 0.4
    x[gone] = oracle.background_color(ref)
    missing = oracle.hand_placement(x, a.kpts, reference=ref)
    assert missing["hand_detect_rate"] == 0.0 and missing["hand_error"] == oracle.MISSING_HAND_ERROR, missing


def test_hand_metric_is_undefined_without_gloves(clips):
    h = clips["head"]
    assert oracle.glove_colors_from_reference(h.reference) == {}
    res = oracle.hand_placement(h.frames, h.kpts, reference=h.reference)
    assert math.isnan(res["hand_error"]) and res["hand_count"] == 0


@pytest.mark.parametrize("res", RES)
def test_identity_distance_small_for_own_reference_large_for_another(clips, res):
    a, b = clips[0], clips[1]
    frames, ref = _view(a, res)
    _, other_ref = _view(b, res)
    own = oracle.identity_distance(frames, ref)
    same_person_other_clip = oracle.identity_distance(frames, _view(clips[4], res)[1])
    other = oracle.identity_distance(frames, other_ref)
    assert own < 0.03 and same_person_other_clip < 0.03, (own, same_person_other_clip)
    assert other > 0.08 and other > 4 * own, (own, other)


@pytest.mark.parametrize("res", RES)
def test_flicker_zero_for_static_frames_and_larger_for_noise(clips, res):
    a = clips[0]
    frames, ref = _view(a, res)
    x = oracle.as_frames(frames)
    static = np.repeat(x[:1], 10, axis=0)
    assert oracle.background_flicker(static, a.kpts[:10], ref) == 0.0
    assert oracle.background_flicker(static) == 0.0
    gt = oracle.background_flicker(frames, a.kpts, ref)
    assert gt < 0.005, gt
    noisy = np.clip(x + np.random.default_rng(0).normal(0, 0.05, x.shape).astype(np.float32), 0, 1)
    assert oracle.background_flicker(noisy, a.kpts, ref) > 0.03
    # one flashing background frame in the middle
    flash = x.copy()
    flash[30] = np.clip(flash[30] * 0.8, 0, 1)
    assert oracle.background_flicker(flash, a.kpts, ref) > gt + 0.003


def test_oracle_metrics_agree_across_input_layouts(clips):
    a = clips[0]
    from_uint8 = oracle.oracle_metrics(a.frames, a.reference, a.kpts, a.audio, FPS)
    from_torch = oracle.oracle_metrics(_torch(a.frames)[None], _torch(a.reference[None]), torch.from_numpy(a.kpts)[None],
                                       torch.from_numpy(a.audio)[None], torch.tensor([FPS]))
    assert set(from_uint8) == {"mouth_sync", "mouth_sync_control", "mouth_sync_margin", "hand_error", "hand_error_px",
                               "hand_detect_rate", "identity_distance", "flicker"}
    for k, v in from_uint8.items():
        assert isinstance(v, float)
        assert from_torch[k] == pytest.approx(v, abs=2e-3), k
    assert from_uint8["mouth_sync"] > 0.9 and from_uint8["hand_error"] < 0.025


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="frames must be"):
        oracle.as_frames(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="kpts have 3 frames but the video has 4"):
        oracle.mouth_opening(np.zeros((4, 8, 8, 3), np.uint8), np.zeros((3, 133, 3), np.float32))
    with pytest.raises(ValueError, match="audio must be mono"):
        oracle.audio_envelope(np.zeros((2, 100)), FPS, 2)


def test_mouth_sync_does_not_leak_from_keypoints_on_noise(clips):
    """The lip keypoints move with the audio; the measuring box must not, or noise frames would score sync."""
    rng = np.random.default_rng(0)
    syncs = []
    for clip in clips.values() if isinstance(clips, dict) else clips:
        if clip.meta["kind"] != "halfbody":
            continue
        for _ in range(4):
            noise = rng.integers(0, 256, clip.frames.shape, dtype=np.uint8)
            syncs.append(oracle.mouth_sync(noise, clip.kpts, clip.audio, FPS)["sync"])
    assert len(syncs) >= 4
    assert abs(float(np.mean(syncs))) < 0.15, syncs
