"""Phases as data (shared/DESIGN.md §2): PhaseSpec / Curriculum, applying a phase to the EchoMimicV2 module and to
the datamodule, and the CurriculumCallback in real fits (Hydra composition + ``halfbody.train.train``), resumed
from a checkpoint taken mid-curriculum."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from lightning.pytorch import Callback
from omegaconf import open_dict

from config_utils import compose_train
from halfbody.data.conditions import PoseRenderer
from halfbody.phases import Curriculum, CurriculumCallback, LinearSchedule, PhaseSpec
from halfbody.train import train

# A small synthetic world (8 train clips, 2 of them headshots) that the datamodule's prepare step generates.
WORLD = ["data.prepare.train_clips=8", "data.prepare.val_clips=2", "data.prepare.num_identities=4",
         "data.prepare.resolution=64", "data.prepare.num_frames=16", "data.prepare.headshot_fraction=0.25",
         "data.prepare.workers=1"]
FAST = [
    "callbacks=curriculum",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.limit_val_batches=0",  # no validation; checkpoints still every val_check_interval steps
    "trainer.val_check_interval=3",
    "callbacks.sample_videos.oracle_metrics=false",
    "data.num_workers=0",
    "data.batch_size=1",
    "data.num_frames=4",
    "data.resolution=32",
    "data.batches_per_epoch=4",  # epochs start at steps 0, 4: one epoch boundary inside a phase
    "model.optimizer.weight_decay=0.01",  # frozen parameters must not decay either
]

# Three tiny phases in the spirit of APDH (EchoMimicV2 §3.2-3.3): pose only with audio muted, then audio on the
# lips with a pose-dropout ramp on headshot clips, then hands-only pose with global audio and temporal training.
PHASES = [
    dict(name="pose", steps=2, trainable=["denoising_unet", "pose_encoder"], muted=["audio_attention"],
         pose_groups="full", pose_dropout=0.0, data={"kinds": ["halfbody"]}),
    dict(name="lips", steps=3, trainable=["audio_attention"], pose_groups="no_lips",
         pose_dropout={"start": 0.0, "end": 0.2}, audio_region="lips", data={"kinds": ["headshot"], "headshot": "pad"}),
    dict(name="hands", steps=2, trainable=["audio_attention", "temporal"], pose_groups="hands", audio_region="global",
         num_frames=2),
]
EXPECTED = [  # per global step: phase index, pose dropout, audio region, pose preset, kinds, frames
    (0, 0.0, "off", "full", {"halfbody"}, 4), (0, 0.0, "off", "full", {"halfbody"}, 4),
    (1, 0.0, "lips", "no_lips", {"headshot"}, 4), (1, 0.1, "lips", "no_lips", {"headshot"}, 4),
    (1, 0.2, "lips", "no_lips", {"headshot"}, 4),
    (2, 0.0, "global", "hands", {"halfbody", "headshot"}, 2), (2, 0.0, "global", "hands", {"halfbody", "headshot"}, 2),
]


_compose = compose_train


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("phase_data")


# ----------------------------------------------------------------------------------------------- spec / curriculum
def test_phase_boundaries_and_after_the_last_phase():
    cur = Curriculum(PHASES)
    assert cur.total_steps == 7 and cur.starts == (0, 2, 5)
    got = [(i, k) for i, _, k in map(cur.phase_at, range(10))]
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4)]
    assert cur.phase_at(4)[1].name == "lips" and cur.index_of("hands") == 2


def test_pose_dropout_schedule_start_middle_end():
    spec = PhaseSpec.from_config(dict(name="ips", steps=10001, trainable=["denoising_unet"],
                                      pose_dropout={"start": 0.0, "end": 0.2}))
    assert spec.pose_dropout == LinearSchedule(0.0, 0.2)
    assert spec.pose_dropout_at(0) == 0.0
    assert spec.pose_dropout_at(5000) == pytest.approx(0.1)
    assert spec.pose_dropout_at(10000) == pytest.approx(0.2)
    assert spec.pose_dropout_at(20000) == pytest.approx(0.2)  # after the curriculum: holds the end value
    assert PhaseSpec.from_config(dict(name="c", steps=3, trainable=["temporal"], pose_dropout=0.05)).pose_dropout_at(2) == 0.05
    assert PhaseSpec.from_config(dict(name="n", steps=3, trainable=["temporal"])).pose_dropout_at(1) is None


@pytest.mark.parametrize("bad, match", [
    (dict(name="a", steps=0, trainable=["x"]), r"phase 'a': steps=0"),
    (dict(name="a", steps=2), r"phase 'a': trainable is missing"),
    (dict(name="a", steps=2, trainable=["x"], wings=1), r"phase 'a': unknown key\(s\) \['wings'\]"),
    (dict(name="a", steps=2, trainable=["x"], pose_groups="no_feet"), r"phase 'a': pose_groups='no_feet'"),
    (dict(name="a", steps=2, trainable=["x"], pose_dropout={"start": 0, "end": 1.5}), r"phase 'a': pose_dropout=.*\[0, 1\]"),
    (dict(name="a", steps=2, trainable=["x"], muted=["x"]), r"phase 'a': group\(s\) \['x'\] are both trainable and muted"),
    (dict(name="a", steps=2, trainable=["x"], data={"kinds": ["fullbody"]}), r"phase 'a': data: .*kinds"),
    (dict(name="a", steps=2, trainable=["x"], data={"fps": 30}), r"phase 'a': unknown data key\(s\) \['fps'\]"),
    (dict(name="a", steps=2, trainable=["x"], num_frames=-4), r"phase 'a': num_frames=-4"),
])
def test_phase_spec_errors_name_phase_and_value(bad, match):
    with pytest.raises(ValueError, match=match):
        PhaseSpec.from_config(bad)


def test_curriculum_errors():
    with pytest.raises(ValueError, match="phases=\\[\\]"):
        Curriculum([])
    with pytest.raises(ValueError, match="phase name 'a' is used twice"):
        Curriculum([dict(name="a", steps=1, trainable=["x"]), dict(name="a", steps=1, trainable=["x"])])


# ----------------------------------------------------------------------------------------------- module side
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hydra.utils.instantiate(_compose([]).model)


def _denoise_inputs(model, audio_seed: int, f: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(0)
    c, k = model.network.latent_channels, model.network.latent_factor
    h = size // k
    cond = {"ref_latents": torch.randn(1, c, h, h, generator=g),
            "audio_feats": torch.randn(1, f, model.audio_encoder.tokens_per_frame, model.audio_encoder.feature_dim,
                                       generator=torch.Generator().manual_seed(audio_seed))}
    mask = torch.zeros(1, f, 1, size, size)
    mask[..., size // 4:, size // 4: 3 * size // 4] = 1.0
    batch = {"pose": torch.rand(1, f, 3, size, size, generator=g), "mask_lips": mask, "mask_head": mask,
             "mask_face": mask}
    return torch.randn(1, f, c, h, h, generator=g), torch.tensor([500]), cond, batch


@torch.no_grad()
def _out(model, audio_seed: int) -> torch.Tensor:
    x, t, cond, batch = _denoise_inputs(model, audio_seed)
    return model.denoise(x, t, cond, batch)


def test_apply_phase_sets_groups_region_mutes_audio_and_schedules(model):
    groups = model.module_groups()
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    spec = PhaseSpec.from_config(dict(name="pose", steps=5, trainable=["pose_encoder", "temporal"],
                                      muted=["audio_attention"], pose_dropout={"start": 0.0, "end": 0.4}))
    model.apply_phase(spec, 0)
    for name, mods in groups.items():
        params = [p for m in mods for p in m.parameters()]
        assert params and all(p.requires_grad == (name in spec.trainable) for p in params), name
        if name not in spec.trainable:
            assert all(p.grad is None for p in params), f"frozen group {name} kept its gradients"
    assert model.audio_region == "off" and model.muted_groups == {"audio_attention"}
    assert model.condition_dropout["pose"] == 0.0
    assert model.set_phase_step(spec, 2) == {"pose_dropout": pytest.approx(0.2)}
    assert model.condition_dropout["pose"] == pytest.approx(0.2)
    keep = model.condition_keep_masks(4000, generator=torch.Generator().manual_seed(1))["pose_keep"]
    # per-sample draws at the scheduled probability, or with the others in the unconditional branch (uncond)
    expected = 0.2 + model.condition_dropout.get("uncond", 0.0) * (1 - 0.2)
    assert 1 - keep.float().mean().item() == pytest.approx(expected, abs=0.03)  # 4.4 standard deviations
    # muted audio: the output does not depend on the audio
    assert torch.equal(_out(model, 1), _out(model, 2))

    # the next phase: audio on (global), pose dropout back to the configured value, everything trainable
    spec2 = PhaseSpec.from_config(dict(name="audio", steps=5, trainable=list(groups), audio_region="global"))
    model.apply_phase(spec2, 0)
    assert model.audio_region == "global" and not model.muted_groups
    assert all(p.requires_grad for p in model.network.parameters())
    assert model.condition_dropout["pose"] == model._configured["pose_dropout"]
    assert not torch.equal(_out(model, 1), _out(model, 2))
    model.apply_phase(PhaseSpec.from_config(dict(name="lips", steps=1, trainable=["audio_attention"],
                                                 audio_region="lips")))
    assert model.audio_region == "lips"
    model.apply_phase(PhaseSpec.from_config(dict(name="unset", steps=1, trainable=["audio_attention"])))
    assert model.audio_region == model._configured["audio_region"]  # unset: the configured region


@pytest.mark.parametrize("bad, match", [
    (dict(trainable=["wings"]), r"phase 'bad': trainable group 'wings' is not a module group of EchoMimicV2Module"),
    (dict(trainable=["temporal"], muted=["reference_net"]), r"phase 'bad': muted group 'reference_net' cannot be muted"),
    (dict(trainable=["temporal"], audio_region="torso"), r"phase 'bad': audio_region='torso'"),
    (dict(trainable=["temporal"], muted=["audio_attention"], audio_region="lips"),
     r"phase 'bad': audio_region='lips' contradicts muted audio_attention"),
    (dict(trainable=["temporal"], losses={"gan": {"weight": 0.1}}), r"phase 'bad': losses key\(s\) \['gan'\]"),
    (dict(trainable=["temporal"], losses={"phd": {"S9": ["pose", 0.1]}}), r"PhD schedule names bands \['S9'\]"),
])
def test_module_rejects_bad_phase(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model.apply_phase(PhaseSpec.from_config(dict(name="bad", steps=1, **bad)))


# ----------------------------------------------------------------------------------------------- data side
PRESETS = ("full", "no_lips", "no_head", "hands")


def _presets_of(pose: torch.Tensor, kpts: torch.Tensor) -> set[str]:
    """The pose presets whose rendering of a sample's keypoints is its pose map (several when they draw the same
    visible keypoints, e.g. ``hands`` and ``no_head`` on a headshot whose hands are out of frame)."""
    f, _, h, w = pose.shape
    k = kpts.numpy().copy()
    k[..., 0] *= w
    k[..., 1] *= h
    errors = {p: float((PoseRenderer(p).render(k, h, w) - pose).abs().mean()) for p in PRESETS}
    return {p for p, e in errors.items() if e < 0.01}


def test_datamodule_applies_phase_data_fields_immediately_in_process(world):
    cfg = _compose(FAST + WORLD + [f"paths.data_dir={world}", "data.batches_per_epoch=10"])
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    first = next(it)
    assert first["video"].shape[1] == 4 and "full" in _presets_of(first["pose"][0], first["kpts"][0])
    dm.apply_phase(PhaseSpec.from_config(dict(name="hands", steps=1, trainable=["temporal"], pose_groups="hands",
                                              data={"kinds": ["halfbody"]}, num_frames=2)))
    for _ in range(2):  # the very next batches (num_workers=0)
        b = next(it)
        assert b["kind"] == ["halfbody"] and b["video"].shape[1] == 2 and b["pose"].shape[1] == 2
        assert _presets_of(b["pose"][0], b["kpts"][0]) == {"hands"}
    dm.apply_phase(PhaseSpec.from_config(dict(name="headshots", steps=1, trainable=["temporal"],
                                              pose_groups="no_lips", data={"kinds": ["headshot"]})))
    for _ in range(2):
        b = next(it)
        assert b["kind"] == ["headshot"] and b["video"].shape[1] == 4
        assert "no_lips" in _presets_of(b["pose"][0], b["kpts"][0]) and b["valid"].min() == 0  # HPA padding
    dm.apply_phase(PhaseSpec.from_config(dict(name="defaults", steps=1, trainable=["temporal"])))
    b = next(it)  # unset fields: back to the configured condition and clip length
    assert b["video"].shape[1] == 4 and "full" in _presets_of(b["pose"][0], b["kpts"][0])
    assert dm.condition_spec.kinds == ("halfbody", "headshot")

    dropping = hydra.utils.instantiate(cfg.data, condition={"pose_dropout": 0.1})
    with pytest.raises(ValueError, match=r"data.condition.pose_dropout=0.1 .* phase 'p'"):
        dropping.apply_phase(PhaseSpec.from_config(dict(name="p", steps=1, trainable=["temporal"], pose_dropout=0.2)))


# ----------------------------------------------------------------------------------------------- real fits
RECORDS: list[dict] = []


class PhaseRecorder(Callback):
    """Test probe (runs after the curriculum callback): what each step trains with, and parameter snapshots."""

    def __init__(self):
        self.steps: list[dict] = []
        self.final: dict[str, list[torch.Tensor]] = {}
        RECORDS.append(self.__dict__)

    @staticmethod
    def _snapshot(pl_module) -> dict[str, list[torch.Tensor]]:
        return {g: [p.detach().clone() for m in mods for p in m.parameters()]
                for g, mods in pl_module.module_groups().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        cur = next(c for c in trainer.callbacks if isinstance(c, CurriculumCallback))
        self.steps.append({
            "step": trainer.global_step, "phase": cur.phase_index, "pose_dropout": pl_module.condition_dropout["pose"],
            "audio_region": pl_module.audio_region,
            "trainable": {g: all(p.requires_grad for m in mods for p in m.parameters())
                          for g, mods in pl_module.module_groups().items()},
            "frozen": {g: not any(p.requires_grad for m in mods for p in m.parameters())
                       for g, mods in pl_module.module_groups().items()},
            "params": self._snapshot(pl_module),
            "pose": batch["pose"][0].cpu(), "kpts": batch["kpts"][0].cpu(), "kind": list(batch["kind"]),
            "frames": batch["video"].shape[1],
        })

    def on_train_end(self, trainer, pl_module):
        self.final = self._snapshot(pl_module)


def _fit(world: Path, out: Path, extra: list[str]) -> dict:
    cfg = _compose(FAST + WORLD + [f"paths.data_dir={world}"] + extra, out)
    with open_dict(cfg):
        cfg.callbacks.curriculum.phases = PHASES
        cfg.callbacks.recorder = {"_target_": f"{__name__}.PhaseRecorder"}
    RECORDS.clear()
    train(cfg)
    assert len(RECORDS) == 1
    return RECORDS[0]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _check_steps(steps: list[dict]) -> None:
    for rec in steps:
        index, dropout, region, preset, kinds, frames = EXPECTED[rec["step"]]
        spec = PHASES[index]
        where = f"step {rec['step']}"
        assert rec["phase"] == index, where
        assert rec["pose_dropout"] == pytest.approx(dropout), where
        assert rec["audio_region"] == region, where
        for g in rec["trainable"]:
            assert (rec["trainable"] if g in spec["trainable"] else rec["frozen"])[g], f"{where}: group {g}"
        assert set(rec["kind"]) <= kinds and rec["frames"] == frames, where
        matches = _presets_of(rec["pose"], rec["kpts"])
        assert preset in matches, f"{where}: pose map matches {matches}, not {preset!r}"
        if index > 0:  # and not the previous phase's keypoints
            assert PHASES[index - 1]["pose_groups"] not in matches, f"{where}: pose map matches {matches}"


@pytest.fixture(scope="module")
def first_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("curriculum_run")
    rec = _fit(world, out, ["logger=csv", "trainer.max_steps=7"])
    return out, rec


def test_fit_through_phases_freezes_unfreezes_and_renders_each_phase(first_run):
    out, rec = first_run
    steps = rec["steps"]
    assert [r["step"] for r in steps] == list(range(7))
    _check_steps(steps)
    params = [r["params"] for r in steps] + [rec["final"]]  # params[g] = before step g; params[7] = after the run

    # denoising_unet / pose_encoder train in phase 0 (steps 0-1), then freeze: bit-identical from step 2 on, even
    # though AdamW holds momentum for them and weight decay is on.
    for g in ("denoising_unet", "pose_encoder"):
        assert not _same(params[0][g], params[2][g]), f"{g} did not train in phase 0"
        assert all(_same(params[2][g], params[s][g]) for s in range(3, 8)), f"{g} changed while frozen"
    # audio_attention: frozen (and muted) in phase 0, trains from phase 1
    assert _same(params[0]["audio_attention"], params[2]["audio_attention"])
    assert not _same(params[2]["audio_attention"], params[5]["audio_attention"])
    # temporal: frozen until phase 2, then trains; reference_net: never trainable
    assert all(_same(params[0]["temporal"], params[s]["temporal"]) for s in range(1, 6))
    assert not _same(params[5]["temporal"], params[7]["temporal"])
    assert all(_same(params[0]["reference_net"], params[s]["reference_net"]) for s in range(1, 8))

    # logged: phase index / pose dropout per step
    metrics = next(out.glob("csv/**/metrics.csv"))
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("phase/index")]
    assert [int(float(r["phase/index"])) for r in rows] == [e[0] for e in EXPECTED]
    assert [float(r["phase/pose_dropout"]) for r in rows] == pytest.approx([e[1] for e in EXPECTED])
    hparams = next(out.glob("csv/**/hparams.yaml")).read_text()
    assert "phase/name: hands" in hparams


def test_checkpoint_holds_phase_and_resume_continues_the_schedule(first_run, world, tmp_path):
    out, rec = first_run
    ckpt = out / "checkpoints" / "step_0000003.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert state["callbacks"]["CurriculumCallback"] == {
        "phase_index": 1, "phase_name": "lips", "global_step": 3, "phase_names": ["pose", "lips", "hands"]}
    resumed = _fit(world, tmp_path, ["logger=none", "trainer.max_steps=6", f"ckpt_path={ckpt}"])
    steps = resumed["steps"]
    # mid-phase 'lips' (step 1 of 3: pose dropout 0.1), across an epoch boundary (step 4) into 'hands' (step 5)
    assert [r["step"] for r in steps] == [3, 4, 5]
    _check_steps(steps)
    # same schedule values and groups as the uninterrupted run
    for r in steps:
        ref = rec["steps"][r["step"]]
        assert (r["phase"], r["pose_dropout"], r["audio_region"], r["trainable"]) == (
            ref["phase"], ref["pose_dropout"], ref["audio_region"], ref["trainable"])
    # the weights restored at step 3 equal those the first run had at step 3
    assert all(_same(steps[0]["params"][g], rec["steps"][3]["params"][g]) for g in steps[0]["params"])


def test_callback_rejects_persistent_workers_with_data_changes(tmp_path):
    """Persistent dataloader workers would never see a phase's data-side change: fail before training."""
    import lightning as L

    from halfbody.data.datamodule import HalfBodyDataModule

    class Tiny(L.LightningModule):
        def apply_phase(self, spec, k=0):
            pass

        def set_phase_step(self, spec, k):
            return {}

    dm = HalfBodyDataModule(train_shards=str(tmp_path), num_workers=2, persistent_workers=True)
    trainer = SimpleNamespace(datamodule=dm, reload_dataloaders_every_n_epochs=0)
    with pytest.raises(ValueError, match=r"data.persistent_workers=true: .* phase 'lips'"):
        CurriculumCallback(PHASES).setup(trainer, Tiny(), "fit")
    trainer.reload_dataloaders_every_n_epochs = 1  # rebuilt loaders start fresh workers every epoch: fine
    CurriculumCallback(PHASES).setup(trainer, Tiny(), "fit")


def test_resume_with_workers_starts_in_the_checkpointed_phase_and_data_changes_wait_for_the_epoch(first_run, world,
                                                                                                  tmp_path):
    """Workers copy the dataset before the trainer restores global_step: the callback's checkpointed step must
    already have set the data side. A data change inside an epoch reaches workers at the next epoch (warned)."""
    out, rec = first_run
    with pytest.warns(UserWarning, match=r"phase 'hands' starts at step 5, inside an epoch of 4 steps.*from step 8"):
        resumed = _fit(world, tmp_path, ["logger=none", "trainer.max_steps=6", "data.num_workers=1",
                                         f"ckpt_path={out / 'checkpoints' / 'step_0000003.ckpt'}"])
    steps = resumed["steps"]
    assert [r["step"] for r in steps] == [3, 4, 5]
    _check_steps(steps[:2])  # step 3 (the resumed epoch's fresh workers) and step 4 (the next epoch's)
    late = steps[2]  # step 5: model side in 'hands', the workers still render 'lips' data until the next epoch
    assert late["phase"] == 2 and late["audio_region"] == "global" and late["frames"] == 4
    assert late["kind"] == ["headshot"] and "no_lips" in _presets_of(late["pose"], late["kpts"])


def _losses(run_dir: Path) -> dict[int, float]:
    import csv

    out: dict[int, float] = {}
    for path in run_dir.glob("csv/**/metrics.csv"):
        with open(path) as fh:
            for row in csv.DictReader(fh):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


def test_killed_and_resumed_run_reproduces_the_uninterrupted_losses(first_run, world, tmp_path):
    """Kill a run mid-curriculum (inside phase 'lips', at the epoch start of step 4), resume it, and compare the losses
    with the uninterrupted run: step randomness is a function of (seed, step, rank) and an epoch's data stream of
    (seed, rank, worker, epoch), so they must match."""
    out, _ = first_run
    uninterrupted = _losses(out)
    assert sorted(uninterrupted) == list(range(7))
    killed = tmp_path / "killed"
    _fit(world, killed, ["logger=csv", "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=4"])
    resumed = tmp_path / "resumed"
    rec = _fit(world, resumed, ["logger=csv", "trainer.max_steps=7",
                                f"ckpt_path={killed / 'checkpoints' / 'step_0000004.ckpt'}"])
    assert [r["step"] for r in rec["steps"]] == [4, 5, 6]
    _check_steps(rec["steps"])
    _, ref = first_run
    for r in rec["steps"]:  # the same batches and the same weights at every resumed step
        assert torch.equal(r["kpts"], ref["steps"][r["step"]]["kpts"]), r["step"]
        assert all(_same(r["params"][g], ref["steps"][r["step"]]["params"][g]) for g in r["params"]), r["step"]
    before, after = _losses(killed), _losses(resumed)
    assert sorted(after) == [4, 5, 6]
    for step in range(4):
        assert before[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-7), step
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-7), step
