"""EchoMimicV2 PhD loss (§3.5, Eq. 2-5): timestep bands, the three pixel terms, and their composition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from halfbody.losses import (
    DetailLoss,
    LowLevelLoss,
    PhDLoss,
    PoseLoss,
    RandomConvPoseExtractor,
    TimestepBands,
    ExportedPoseExtractor,
    TorchScriptPoseExtractor,
    per_clip,
)
from halfbody.models.autoencoders import PatchAutoencoder
from halfbody.models.pretrained import PretrainedNotFoundError
from halfbody.models.schedulers import VPredictionDDIM

KEY = "model.phd.lpips.backbone_path"
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*is deprecated:FutureWarning")  # TorchScript round trip


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _edge_image(offset: int, size: int = 32) -> torch.Tensor:
    """A vertical step edge at column ``size // 2 + offset``: (1, 3, H, W) in [-1, 1]."""
    img = torch.full((1, 3, size, size), -0.5)
    img[..., size // 2 + offset:] = 0.5
    return img


@pytest.fixture(scope="module")
def lpips_stand_in() -> LowLevelLoss:
    return LowLevelLoss("alex", stand_in=True)


@pytest.fixture(scope="module")
def schedule() -> VPredictionDDIM:
    return VPredictionDDIM()


# ---------------------------------------------------------------------------------------------------- bands

def test_bands_paper_edges():
    bands = TimestepBands(1000)
    assert bands.ranges() == {"S1": (900, 1000), "S2": (300, 900), "S3": (0, 300)}
    assert [bands.band_of(t) for t in (999, 900, 899, 300, 299, 0)] == ["S1", "S1", "S2", "S2", "S3", "S3"]
    masks = bands.band_masks(torch.tensor([899, 900, 299, 300]))
    assert masks["S1"].tolist() == [False, True, False, False]
    assert masks["S2"].tolist() == [True, False, False, True]
    assert masks["S3"].tolist() == [False, False, True, False]
    every = torch.arange(1000)
    total = sum(m.long() for m in bands.band_masks(every).values())
    assert torch.equal(total, torch.ones(1000, dtype=torch.long))  # a partition of [0, T)


def test_bands_configurable_and_validated():
    bands = TimestepBands(10, {"early": 0.5, "late": 0.5})
    assert bands.ranges() == {"early": (5, 10), "late": (0, 5)}
    with pytest.raises(ValueError, match="sum to 1"):
        TimestepBands(1000, {"S1": 0.2, "S2": 0.6, "S3": 0.3})
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        TimestepBands(1000).band_masks(torch.tensor([1000]))
    with pytest.raises(TypeError, match="integer"):
        TimestepBands(1000).band_masks(torch.tensor([0.5]))


def test_bands_feed_sample_timesteps(schedule):
    lo, hi = TimestepBands(schedule.num_train_timesteps).ranges()["S1"]
    t = schedule.sample_timesteps(64, generator=torch.Generator().manual_seed(0), t_min=lo, t_max=hi)
    assert int(t.min()) >= 900 and int(t.max()) <= 999


# ---------------------------------------------------------------------------------------------------- detail

@pytest.mark.parametrize("channels,mode", [("rgb", "xy"), ("luma", "magnitude")])
def test_detail_loss_properties(channels, mode):
    loss = DetailLoss(channels=channels, mode=mode)
    a = _edge_image(0)
    assert float(loss(a, a.clone())[0]) == 0.0
    assert float(loss(_edge_image(3), a)[0]) > 0.1  # shifted edge
    assert float(loss(a + 0.3, a)[0]) < 1e-10  # constant brightness shift: edges unchanged (replicate padding)
    pred = _images(2).requires_grad_(True)
    loss(pred, _images(2, seed=1)).sum().backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0


def test_detail_kernels_are_fixed_buffers():
    loss = DetailLoss()
    assert list(loss.parameters()) == [] and "kernels" not in loss.state_dict()
    assert torch.equal(loss.kernels[0, 0], torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]))
    loss.train()
    assert not loss.training


# ---------------------------------------------------------------------------------------------------- LPIPS

def test_lpips_stand_in_values_and_gradients(lpips_stand_in):
    x = _images(2)
    assert lpips_stand_in.stand_in and "RANDOM backbone: stand-in" in lpips_stand_in.describe()
    same = lpips_stand_in(x, x.clone())
    noisy = lpips_stand_in((x + 0.5 * torch.randn_like(x)).clamp(-1, 1), x)
    assert same.shape == (2,) and float(same.abs().max()) < 1e-6
    assert float(noisy.min()) > 10 * float(same.abs().max()) and float(noisy.min()) > 1e-3
    pred = x.clone().add_(0.1 * torch.randn_like(x)).requires_grad_(True)
    lpips_stand_in(pred, x).sum().backward()
    assert float(pred.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips_stand_in.parameters())
    lpips_stand_in.train()
    assert not lpips_stand_in.training


def test_lpips_small_inputs_are_upscaled(lpips_stand_in):
    x = _images(1, size=16)
    assert float(lpips_stand_in(-x, x)[0]) > 0  # AlexNet alone would fail below ~31 px


def test_lpips_missing_backbone_names_the_key(tmp_path):
    with pytest.raises(PretrainedNotFoundError, match=KEY):
        LowLevelLoss("alex")
    with pytest.raises(PretrainedNotFoundError, match=f"{KEY}.*not a file"):
        LowLevelLoss("alex", backbone_path=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="choose one"):
        LowLevelLoss("alex", backbone_path=str(tmp_path / "nope.pth"), stand_in=True)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_lpips_loads_torchvision_backbone(tmp_path, fmt):
    import torchvision

    torch.manual_seed(123)
    full = torchvision.models.alexnet(weights=None).state_dict()
    # the loader ignores the classifier; keep the file small by saving the torchvision `features.*` tensors only
    sd = {k: v for k, v in full.items() if k.startswith("features.")}
    path = tmp_path / f"alexnet.{fmt}"
    if fmt == "pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    loss = LowLevelLoss("alex", backbone_path=str(path))
    assert not loss.stand_in and str(path) in loss.describe() and "RANDOM" not in loss.describe()
    assert torch.equal(loss.lpips.net.slice1[0].weight, sd["features.0.weight"])
    assert torch.equal(getattr(loss.lpips.net.slice5, "10").bias, sd["features.10.bias"])
    # the shipped linear layers are in place (strictly loaded), not the random init
    import lpips as lpips_pkg
    from halfbody.losses import lpips_linear_weights_path

    shipped = torch.load(lpips_linear_weights_path("alex"), map_location="cpu", weights_only=True)
    assert torch.equal(loss.lpips.lin0.model[0].weight, shipped["lin0.model.1.weight"])
    assert lpips_pkg is not None
    x = _images(1)
    assert float(loss(-x, x)[0]) > 0


def test_lpips_rejects_wrong_backbone(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match=f"{KEY}.*not a torchvision alexnet"):
        LowLevelLoss("alex", backbone_path=str(path))


# ---------------------------------------------------------------------------------------------------- pose

def test_pose_loss_stand_in_gradients():
    loss = PoseLoss(RandomConvPoseExtractor(num_keypoints=5))
    assert loss.stand_in and "stand-in" in loss.describe()
    target = _images(2)
    assert float(loss(target, target.clone()).abs().max()) == 0.0
    pred = _images(2, seed=3).requires_grad_(True)
    value = loss(pred, target)
    assert value.shape == (2,) and float(value.detach().min()) > 0
    value.sum().backward()
    assert float(pred.grad.abs().sum()) > 0
    assert all(p.grad is None for p in loss.parameters())


class _TinyHeatmapNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).softmax(dim=1)


class _TinySimCCNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x)
        return h.mean(dim=2), h.mean(dim=3)  # (N, J, W), (N, J, H)


def test_torchscript_extractor_round_trip(tmp_path):
    net = _TinyHeatmapNet().eval()
    path = tmp_path / "pose.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    ext = TorchScriptPoseExtractor(str(path), input_range="zero_one", input_size=(16, 16))
    assert not ext.stand_in and str(path) in ext.describe()
    x = _images(2)
    expected = net(torch.nn.functional.interpolate((x + 1) / 2, size=(16, 16), mode="bilinear", align_corners=False))
    assert torch.allclose(ext(x), expected, atol=1e-6)
    assert ext(x).shape == (2, 4, 8, 8) and ext.num_keypoints == 4
    loss = PoseLoss(ext)
    pred = _images(2, seed=5).requires_grad_(True)
    loss(pred, x).sum().backward()
    assert float(pred.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in ext.parameters())

    simcc = tmp_path / "simcc.pt"
    torch.jit.save(torch.jit.script(_TinySimCCNet()), str(simcc))
    assert TorchScriptPoseExtractor(str(simcc))(x).shape == (2, 4, 64)  # (N, J, Lx + Ly)


def test_torch_export_extractor_round_trip(tmp_path):
    class _WithBatchNorm(_TinyHeatmapNet):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)).softmax(dim=1)

    net = _WithBatchNorm().eval()
    path = tmp_path / "pose.pt2"
    program = torch.export.export(net, (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("n")},))
    torch.export.save(program, str(path))
    ext = ExportedPoseExtractor(str(path))
    assert ext.exported and "torch.export" in ext.describe()
    holder = nn.Sequential(PoseLoss(ext))
    holder.train()  # must neither fail (exported graphs refuse .train()) nor leave eval mode
    assert not holder[0].training and not ext.training
    x = _images(3)
    assert torch.allclose(ext(x), net(x), atol=1e-6)
    pred = _images(3, seed=7).requires_grad_(True)
    holder[0](pred, x).sum().backward()
    assert float(pred.grad.abs().sum()) > 0 and all(p.grad is None for p in ext.parameters())


def test_torchscript_extractor_errors_name_the_key(tmp_path):
    with pytest.raises(PretrainedNotFoundError, match="model.phd.pose.extractor_path"):
        TorchScriptPoseExtractor(None)
    with pytest.raises(PretrainedNotFoundError, match="my.key"):
        TorchScriptPoseExtractor(str(tmp_path / "missing.pt"), key="my.key")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="my.key.*torch.jit.load"):
        TorchScriptPoseExtractor(str(bad), key="my.key")
    bad2 = tmp_path / "bad.pt2"
    bad2.write_bytes(b"not an exported program")
    with pytest.raises(ValueError, match="my.key.*torch.export.load"):
        ExportedPoseExtractor(str(bad2), key="my.key")


# ---------------------------------------------------------------------------------------------------- PhD composition

class _Counting(nn.Module):
    """Wraps a term, counting calls and frames."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls, self.frames = inner, 0, 0

    def forward(self, pred, target, valid=None):
        self.calls += 1
        self.frames += pred.shape[0]
        return self.inner(pred, target, valid)


class _CountingDecode:
    def __init__(self, ae: PatchAutoencoder) -> None:
        self.ae, self.batch_sizes = ae, []

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(latents.shape[0])
        return self.ae.decode(latents)


def _clip_batch(t: list[int], frames: int = 2, size: int = 32, seed: int = 0):
    ae = PatchAutoencoder(patch_size=4)
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(len(t), frames, 3, size, size, generator=g) * 2 - 1
    x0 = ae.encode(video)
    x_t = torch.randn(x0.shape, generator=g)
    v_pred = torch.randn(x0.shape, generator=g).requires_grad_(True)
    return ae, video, x_t, v_pred, torch.tensor(t)


def _phd(lpips_stand_in, schedule=None) -> PhDLoss:
    terms = {"pose": _Counting(PoseLoss(RandomConvPoseExtractor(num_keypoints=3))),
             "detail": _Counting(DetailLoss()), "low": _Counting(lpips_stand_in)}
    return PhDLoss(terms, schedule=schedule)


def test_phd_decodes_only_active_bands(lpips_stand_in, schedule):
    ae, video, x_t, v_pred, t = _clip_batch([950, 500, 100, 990, 450])
    phd = _phd(lpips_stand_in, {"S1": ["pose", 0.1], "S2": ["detail", 0.0], "S3": {"term": "low", "weight": 0.1}})
    decode = _CountingDecode(ae)
    out = phd(x_t, v_pred, t, video, decode, schedule)
    assert decode.batch_sizes == [3]  # samples 0, 2, 3 (S1, S3, S1); S2 is weight 0: not decoded
    assert out.decoded == 3 and float(out.logs["phd/decoded"]) == 3
    assert phd.terms["detail"].calls == 0  # weight-0 term skipped entirely
    assert (phd.terms["pose"].calls, phd.terms["pose"].frames) == (1, 4)  # 2 clips x 2 frames
    assert (phd.terms["low"].calls, phd.terms["low"].frames) == (1, 2)
    assert out.loss.shape == (5,) and out.loss[1] == 0 and out.loss[4] == 0
    assert bool((out.loss[[0, 2, 3]] > 0).all())
    assert set(out.logs) == {"phd/pose", "phd/pose_n", "phd/low", "phd/low_n", "phd/decoded", "phd/loss"}

    # the values are lambda * per-clip term of the decoded one-step prediction (Eq. 5)
    with torch.no_grad():
        pixels = ae.decode(schedule.predict_x0(x_t, v_pred, t))
        low = per_clip(lpips_stand_in(pixels[2].flatten(0, 0), video[2]), 2)
    assert torch.allclose(out.loss[2], 0.1 * low[0], rtol=1e-4, atol=1e-7)

    out.loss.sum().backward()  # the loss trains through the decoder into the v-prediction
    assert float(v_pred.grad[[0, 2, 3]].abs().sum()) > 0 and float(v_pred.grad[[1, 4]].abs().sum()) == 0


def test_phd_skips_all_work_when_nothing_needs_it(lpips_stand_in, schedule):
    ae, video, x_t, v_pred, t = _clip_batch([400, 500])
    decode = _CountingDecode(ae)
    phd = _phd(lpips_stand_in, {"S1": ["pose", 0.1], "S3": ["low", 0.1]})  # S2 removed ("w/o L_detail")
    out = phd(x_t, v_pred, t, video, decode, schedule)
    assert decode.batch_sizes == [] and out.decoded == 0 and float(out.loss.abs().sum()) == 0
    assert float(out.logs["phd/pose_n"]) == 0 and float(out.logs["phd/pose"]) == 0
    phd.configure(enabled=False)
    _, _, x_t, v_pred, t = _clip_batch([950, 100])
    out = phd(x_t, v_pred, t, video, decode, schedule)
    assert decode.batch_sizes == [] and set(out.logs) == {"phd/decoded", "phd/loss"}
    assert all(m.calls == 0 for m in phd.terms.values())


def test_phd_valid_mask_excludes_padding(lpips_stand_in, schedule):
    b, f, size = 3, 2, 32
    valid = torch.ones(b, f, 1, size, size)
    valid[..., :, 20:] = 0  # right-hand padding (HPA / letterbox)
    target = torch.rand(b * f, 3, size, size) * 2 - 1
    pred = target.clone()
    pred[..., :, 20:] = torch.rand(b * f, 3, size, 12) * 2 - 1  # differs only in the padding
    for term in (DetailLoss(), lpips_stand_in, PoseLoss(RandomConvPoseExtractor())):
        assert float(term(pred, target, valid.flatten(0, 1)).abs().max()) == 0.0
        assert float(term(pred, target).min()) > 0  # ... which the unmasked loss does see

    # through the composition: a decode whose output differs from the target only in the padding
    ae, video, x_t, v_pred, t = _clip_batch([950, 500, 100], frames=f, size=size)
    video = target.view(b, f, 3, size, size)
    decoded = pred.view(b, f, 3, size, size)
    phd = _phd(lpips_stand_in)
    out = phd(x_t, v_pred, t, video, lambda z: decoded + 0 * z.sum(), schedule, valid=valid)
    assert out.decoded == 3 and float(out.loss.detach().abs().max()) == 0.0
    out = phd(x_t, v_pred, t, video, lambda z: decoded + 0 * z.sum(), schedule)
    assert bool((out.loss.detach() > 0).all())


def test_phd_validation_and_checkpoint_keys(lpips_stand_in, schedule):
    with pytest.raises(ValueError, match=r"terms \['low', 'pose'\]"):
        PhDLoss({"detail": DetailLoss()})  # the paper schedule needs pose and low
    phd = PhDLoss({"detail": DetailLoss()}, schedule={"S2": ["detail", 0.1], "S1": ["pose", 0.0]})
    with pytest.raises(ValueError, match="bands"):
        phd.configure(schedule={"S4": ["detail", 0.1]})
    with pytest.raises(ValueError, match="T=1000.*T=10"):
        ae, video, x_t, v_pred, t = _clip_batch([5])
        phd(x_t, v_pred, t, video, ae.decode, VPredictionDDIM(num_train_timesteps=10))

    # frozen term networks are loaded from their own paths: never in (or taken from) a checkpoint
    parent = nn.Module()
    parent.head = nn.Linear(2, 2)
    parent.phd = _phd(lpips_stand_in)
    sd = parent.state_dict()
    assert set(sd) == {"head.weight", "head.bias"}
    before = lpips_stand_in.lpips.lin0.model[0].weight.clone()
    stray = dict(sd, **{"phd.terms.low.inner.lpips.lin0.model.0.weight": torch.zeros_like(before)})
    parent.load_state_dict(stray, strict=True)
    parent.load_state_dict(sd, strict=True)
    assert torch.equal(lpips_stand_in.lpips.lin0.model[0].weight, before)


def test_phd_tiny_preset_describes_stand_ins():
    phd = PhDLoss.tiny()
    text = phd.describe()
    assert "S1: pose x 0.1" in text and "S3: low x 0.1" in text
    assert text.count("stand-in") == 2
