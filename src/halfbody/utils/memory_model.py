"""Per-GPU memory of one training step at paper scale, estimated without a GPU (issue 13 §4).

Two parts, each from the real model the run would build:

- **States** (parameters, gradients, optimizer state) from the LightningModule built on the *meta* device (shapes and
  dtypes, no memory, no weights read): the pretrained parts are built from their architecture configs
  (:func:`pretrained_architectures`: the directory's ``config.json`` when it exists, else the published checkpoint's
  architecture), the curriculum phase decides what trains, and the parallelism (``cfg.parallelize``, ``trainer=fsdp``)
  decides how they are stored: FSDP2 with a bf16 parameter / fp32 reduce policy keeps fp32 master weights, fp32
  gradients and Adam's two fp32 moments of the *trainable* parameters sharded over the world size, the frozen network
  parameters sharded without gradients, and the frozen parts outside the network (autoencoder, audio encoder, PhD
  extractors) replicated; plus the unsharded bf16 weights of the FSDP units being gathered (the largest unit and the
  one prefetched after it) and one unit's unsharded gradients before their reduce-scatter. Without sharding (``gpu``,
  ``ddp``) everything is replicated, DDP adds its gradient buckets and bf16 autocast its cached weight copies.
- **Activations**: the training step itself (frozen encoders, network forward, loss, the PhD loss's VAE decode and
  extractors, the backward pass) run on the meta device at the paper shape under :class:`LiveMemory`, a dispatch mode
  that plays the allocator: every op's output storage is live until the program drops its last reference, and the
  peak of the live bytes is the step's activation peak (saved tensors, gradients of activations and temporaries
  alike). Activation checkpointing is the family's own (``parallelize`` applied to the meta model), so its recompute
  in the backward pass is simulated, not modelled. Attention is counted as the fused GPU kernels store it (flash /
  memory-efficient attention: ``q, k, v``, the output and the fp32 log-sum-exp are saved, never the ``L x L``
  weights): :func:`fused_attention`. Parameter gradients are released as soon as they are accumulated (FSDP2
  reduce-scatters and frees each unit's), so the states above hold them.

The simulated peak is checked against a measured one (the rise of the peak resident memory of the real step on CPU at
a tiny shape: simulated / measured = 0.89) in ``tests/test_memory.py``; ``python -m halfbody.memory`` prints the table
and a verdict against ``memory.gpu_gib``.
Not counted: CUDA context and NCCL buffers (a fixed ``memory.reserved_gib``), allocator fragmentation, the audio
encoder's forward (features are given precomputed; whisper-tiny / wav2vec2-base are small), dataloader workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import sys
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1024**3

# The published checkpoints' architectures (their config.json), used when the pretrained directory is not on this
# machine: the estimate needs shapes only. Keys: the class that ``load_pretrained`` is asked to build.
REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    # SD1.5 / lambdalabs/sd-image-variations-diffusers unet/ (diffusers defaults + CLIP-image width 768)
    "UNet2DConditionModel": {"sample_size": 64, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 768,
                             "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                             "attention_head_dim": 8},
    # stabilityai/sd-vae-ft-mse
    "AutoencoderKL": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
                      "block_out_channels": [128, 256, 512, 512], "sample_size": 256, "scaling_factor": 0.18215,
                      "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4},
    # Lightricks/LTX-Video 2B (0.9.x) transformer/ and vae/: the diffusers class defaults are that checkpoint's
    "LTXVideoTransformer3DModel": {},
    "AutoencoderKLLTXVideo": {},
    # openai/whisper-tiny (the release's audio_processor/tiny.pt has the same dims)
    "WhisperModel": {"d_model": 384, "encoder_layers": 4, "decoder_layers": 4, "encoder_attention_heads": 6,
                     "decoder_attention_heads": 6, "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536,
                     "num_mel_bins": 80, "max_source_positions": 1500, "vocab_size": 51865},
    # facebook/wav2vec2-base (transformers' defaults are the base model)
    "Wav2Vec2Model": {},
}


# ------------------------------------------------------------------------------------------------ the meta model
# weight-file names a loader may look for before it calls load_pretrained; a stand-in directory holds empty ones
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                 "pytorch_model.bin")


def _architecture_config(cls: type, path: Any) -> dict[str, Any]:
    p = Path(str(path)).expanduser() if path else None
    if p is not None and (p / "config.json").is_file():
        config = json.loads((p / "config.json").read_text() or "{}")
        if config:
            return {k: v for k, v in config.items() if not k.startswith("_")}
    if cls.__name__ not in REFERENCE_CONFIGS:
        raise KeyError(f"no reference architecture for {cls.__name__} (and no config.json at {path})")
    return dict(REFERENCE_CONFIGS[cls.__name__])


def _build_from_config(cls: type, path: Any, key: str = "", expected: str = "", **kwargs: Any) -> Any:
    config = _architecture_config(cls, path)
    if hasattr(cls, "from_config"):  # diffusers
        return cls.from_config(config)
    return cls(cls.config_class(**config))  # transformers


@contextlib.contextmanager
def pretrained_architectures() -> Iterator[None]:
    """Inside: every pretrained part that halfbody loads through ``halfbody.models.pretrained.load_pretrained`` is
    built from its architecture config with fresh (random, or meta under ``torch.device("meta")``) weights; nothing is
    read but ``config.json``. OpenAI-format Whisper files, absent here, fall through to the same path."""
    import tempfile

    from halfbody.models import audio_encoders, pretrained

    originals = {"load_pretrained": pretrained.load_pretrained,
                 "require_pretrained_dir": pretrained.require_pretrained_dir}
    fingerprint = audio_encoders.checkpoint_fingerprint
    stand_ins = Path(tempfile.mkdtemp(prefix="halfbody-architectures-"))

    def require_dir(path, key, expected, required_files=("config.json",)):
        """An existing directory as it is; a missing one becomes an empty stand-in (config.json "{}": the reference
        architecture), so the loader goes on to ``load_pretrained`` (patched: nothing is read)."""
        p = Path(str(path)).expanduser() if path else None
        if p is not None and p.is_dir():
            return originals["require_pretrained_dir"](path, key, expected, required_files)
        d = stand_ins / str(key).replace("/", "_")
        d.mkdir(parents=True, exist_ok=True)
        for name in (*required_files, *_WEIGHT_NAMES):
            (d / name).touch()
        return d

    replacements = {"load_pretrained": _build_from_config, "require_pretrained_dir": require_dir}
    patched = [(m, attr) for name, m in list(sys.modules.items()) if name.startswith("halfbody")
               for attr, fn in originals.items() if getattr(m, attr, None) is fn]
    for m, attr in patched:
        setattr(m, attr, replacements[attr])
    audio_encoders.checkpoint_fingerprint = lambda path: fingerprint(path) if Path(path).exists() else "unread"
    try:
        yield
    finally:
        for m, attr in patched:
            setattr(m, attr, originals[attr])
        # modules imported inside the block bound the replacements at import: restore them too
        for m in list(sys.modules.values()):
            if getattr(m, "__name__", "").startswith("halfbody"):
                for attr, fn in replacements.items():
                    if getattr(m, attr, None) is fn:
                        setattr(m, attr, originals[attr])
        audio_encoders.checkpoint_fingerprint = fingerprint
        import shutil

        shutil.rmtree(stand_ins, ignore_errors=True)


def _module_config(cfg: Any) -> Any:
    """``cfg.model`` with the PhD loss's extractors replaced by same-role stand-ins that need no files (LPIPS AlexNet
    with a random backbone has the real architecture; the pose extractor is a small conv stack)."""
    from omegaconf import OmegaConf, open_dict

    model = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    phd = model.get("phd_loss")
    if phd is not None and phd.get("terms") is not None:
        with open_dict(model):
            model.phd_loss = {"_target_": "halfbody.losses.phd.PhDLoss.tiny",
                              **{k: v for k, v in phd.items() if k in ("bands", "schedule", "enabled")}}
    with open_dict(model):
        model.init_checkpoint = None
    return model


def build_module_on_meta(cfg: Any) -> nn.Module:
    """The run's LightningModule (``cfg.model``) on the meta device, parallelism settings attached."""
    import hydra

    with pretrained_architectures(), torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... is a no-op": meant here
        module = hydra.utils.instantiate(_module_config(cfg))
    module.to("meta")  # tensors made by constructors that ignore the device context (legacy torch.Tensor(...))
    module._device = torch.device("meta")
    if cfg.get("parallelize") is not None:
        module.parallelism = hydra.utils.instantiate(cfg.parallelize)
    return module


# -------------------------------------------------------------------------------------------- the family's layout
@dataclass
class Layout:
    """What the family's parallelize function names: blocks (checkpointed, compiled) and FSDP units."""

    blocks: list[nn.Module]
    units: list[nn.Module]


def family_layout(module: nn.Module) -> Layout:
    """Run the family's parallelize function with its final step captured: the blocks and FSDP units it would use."""
    from halfbody.models import parallel

    captured: dict[str, Any] = {}
    original = parallel.parallelize_blocks

    def capture(network, settings, mesh, *, blocks, units, **kwargs):
        captured.update(blocks=list(blocks), units=list(units))
        return {}

    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("halfbody") and getattr(m, "parallelize_blocks", None) is original]
    for m in patched:
        m.parallelize_blocks = capture
    logging.disable(logging.INFO)  # the family logs what it applied: nothing, here
    try:
        module.parallelize_network(parallel.Parallelism(), None)
    except NotImplementedError:
        return Layout([], [])
    finally:
        logging.disable(logging.NOTSET)
        # modules imported during the call (a family's parallelize module) bound the capture too: restore all
        for m in list(sys.modules.values()):
            if getattr(m, "__name__", "").startswith("halfbody") and getattr(m, "parallelize_blocks", None) is capture:
                m.parallelize_blocks = original
    return Layout(captured.get("blocks", []), captured.get("units", []))


# ---------------------------------------------------------------------------------------------------- attention
class _FusedAttention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(d) + mask) v`` as flash / memory-efficient attention stores it: saves q, k, v, the mask,
    the output and a float32 log-sum-exp ``(B, H, L)``; the backward allocates the three input gradients."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, *([] if mask is None else [mask]))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    return _FusedAttention.apply(query, key, value, attn_mask)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` as the fused GPU kernels store it (meta tensors only: no values)."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


# ------------------------------------------------------------------------------------------------ the allocator
class LiveMemory(TorchDispatchMode):
    """Plays the allocator for every op run inside it: an output's storage counts from its creation until the last
    tensor that holds it is dropped (views share their base's storage). ``peak`` is the largest sum reached;
    ``exclude`` storages (parameters) are never counted."""

    def __init__(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.largest = 0
        self.excluded = {t.untyped_storage()._cdata for t in exclude}

    def _release(self, sid: int) -> None:
        self.refs[sid] -= 1
        if not self.refs[sid]:
            del self.refs[sid]
            self.live -= self.sizes.pop(sid)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            sid = storage._cdata
            if sid in self.excluded:
                continue
            if sid not in self.refs:
                self.refs[sid] = 0
                self.sizes[sid] = storage.nbytes()
                self.live += self.sizes[sid]
                self.largest = max(self.largest, self.sizes[sid])
                self.peak = max(self.peak, self.live)
            self.refs[sid] += 1
            weakref.finalize(t, self._release, sid)
        return out


# --------------------------------------------------------------------------------------------------- the batch
def training_batch(module: nn.Module, batch_size: int, num_frames: int, resolution: Any, fps: float,
                   device: torch.device | str = "meta", dtype: torch.dtype = torch.float32,
                   generator: torch.Generator | None = None) -> dict[str, Any]:
    """A batch with every key of docs/ARCHITECTURE.md's training sample, at the given shape; audio as precomputed
    ``audio_feats`` of the module's audio encoder (``(B, F, K, D)``). Random values off the meta device."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(int(v) for v in resolution)
    b, f = int(batch_size), int(num_frames)
    enc = module.audio_encoder

    def rnd(*shape, lo=-1.0, hi=1.0):
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return (torch.rand(*shape, generator=generator, dtype=dtype) * (hi - lo) + lo).to(device)

    def mask(*shape):
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        m = torch.zeros(*shape, dtype=dtype)
        m[..., h // 4: h // 2, w // 4: 3 * w // 4] = 1.0
        return m.to(device)

    valid = rnd(b, f, 1, h, w, lo=1.0, hi=1.0) if torch.device(device).type == "meta" else \
        torch.ones(b, f, 1, h, w, dtype=dtype, device=device)
    return {
        "video": rnd(b, f, 3, h, w), "ref": rnd(b, 3, h, w), "pose": rnd(b, f, 3, h, w, lo=0.0),
        "mask_lips": mask(b, f, 1, h, w), "mask_head": mask(b, f, 1, h, w), "mask_face": mask(b, f, 1, h, w),
        "valid": valid, "kpts": rnd(b, f, 133, 3, lo=0.0),
        "audio_feats": rnd(b, f, enc.tokens_per_frame, enc.feature_dim),
        "fps": torch.full((b,), float(fps), device=device, dtype=torch.float32),
        "host": {"fps": float(fps)},
        "key": [f"s{i}" for i in range(b)], "identity": ["id"] * b, "kind": ["halfbody"] * b,
    }


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class MemorySettings:
    """How the run stores its states (from ``cfg.trainer`` and ``cfg.parallelize``)."""

    world_size: int = 1
    sharded: bool = False  # FSDP2 (trainer=fsdp)
    ddp: bool = False
    param_bytes: int = 4  # compute dtype of the network (bf16 under FSDP2's policy or bf16 autocast)
    reduce_bytes: int = 4
    autocast: bool = False  # trainer precision bf16-mixed / 16-mixed (not under FSDP2)
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    optimizer_states: int = 2  # Adam / AdamW: exp_avg, exp_avg_sq (fp32)

    @classmethod
    def from_config(cls, cfg: Any) -> "MemorySettings":
        from halfbody.models.parallel import Parallelism

        trainer = cfg.trainer
        strategy = str((trainer.get("strategy") or {}).get("_target_", "")) if hasattr(trainer.get("strategy"), "get") \
            else str(trainer.get("strategy") or "")
        devices = trainer.get("devices", 1)
        devices = devices if isinstance(devices, int) and devices > 0 else 1
        world = devices * int(trainer.get("num_nodes", 1) or 1)
        par = Parallelism.from_config(cfg.get("parallelize"))
        sharded = "FSDP" in strategy or "ModelParallel" in strategy
        precision = str(trainer.get("precision", "32-true"))
        param_dtype, reduce_dtype = par.mixed_precision()
        opt = str(cfg.model.get("optimizer", {}).get("_target_", "torch.optim.AdamW"))
        states = 2 if "Adam" in opt else (1 if "SGD" in opt or "Lion" in opt else 2)
        if sharded:
            pbytes, rbytes, autocast = param_dtype.itemsize, reduce_dtype.itemsize, False
        else:
            autocast = "mixed" in precision and not precision.startswith("32")
            pbytes = 2 if autocast or "bf16-true" in precision or "16-true" in precision else 4
            rbytes = 4
        return cls(world_size=world, sharded=sharded, ddp="DDP" in strategy or (world > 1 and not sharded),
                   param_bytes=pbytes, reduce_bytes=rbytes, autocast=autocast,
                   cpu_offload=bool(par.fsdp.cpu_offload) if sharded else False,  # type: ignore[union-attr]
                   reshard_after_forward=bool(par.fsdp.reshard_after_forward),  # type: ignore[union-attr]
                   activation_checkpointing=bool(par.activation_checkpointing), optimizer_states=states)

    @property
    def compute_dtype(self) -> torch.dtype:
        return {2: torch.bfloat16, 4: torch.float32}[self.param_bytes]


# ------------------------------------------------------------------------------------------------------ states
def _numel(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _unique(params) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@dataclass
class StateCounts:
    trainable: int
    frozen_network: int
    frozen_parts: int  # autoencoder, audio encoder, loss extractors: outside the network, replicated
    frozen_parts_bytes: int
    largest_unit: int  # parameters of the largest FSDP unit (the root's own parameters included)
    largest_unit_trainable: int
    units_total: int


def count_states(module: nn.Module, layout: Layout) -> StateCounts:
    network = module.network
    net_params = _unique(network.parameters())
    net_ids = {id(p) for p in net_params}
    trainable = [p for p in net_params if p.requires_grad]
    others = [p for p in _unique(module.parameters()) if id(p) not in net_ids]
    # FSDP units: each unit's parameters not in an earlier (child) unit; the root takes the rest
    claimed: set[int] = set()
    sizes: list[tuple[int, int]] = []
    for unit in layout.units:
        own = [p for p in _unique(unit.parameters()) if id(p) not in claimed]
        claimed |= {id(p) for p in own}
        if own:
            sizes.append((_numel(own), _numel([p for p in own if p.requires_grad])))
    root = [p for p in net_params if id(p) not in claimed]
    sizes.append((_numel(root), _numel([p for p in root if p.requires_grad])))
    largest = max(sizes)
    return StateCounts(trainable=_numel(trainable), frozen_network=_numel(net_params) - _numel(trainable),
                       frozen_parts=_numel(others),
                       frozen_parts_bytes=sum(p.numel() * p.element_size() for p in others),
                       largest_unit=largest[0], largest_unit_trainable=max(s[1] for s in sizes),
                       units_total=_numel(net_params))


def state_rows(counts: StateCounts, s: MemorySettings) -> list[tuple[str, int, str]]:
    """``(component, bytes per GPU, how)`` rows of the states."""
    n = s.world_size if s.sharded else 1
    where = f"/ {n} GPUs" if s.sharded else "replicated"
    rows = []
    if s.sharded:
        dev = 0 if s.cpu_offload else 1
        rows.append(("parameters, trainable (fp32 master)", dev * 4 * counts.trainable // n, where))
        rows.append(("parameters, frozen network (fp32)", dev * 4 * counts.frozen_network // n, where))
        rows.append(("gradients (fp32)", dev * 4 * counts.trainable // n, where))
        rows.append((f"optimizer state ({s.optimizer_states} x fp32)",
                     dev * 4 * s.optimizer_states * counts.trainable // n,
                     where + (" (CPU offload: on the host)" if s.cpu_offload else "")))
        units = 2 if s.reshard_after_forward else None
        gathered = (units * counts.largest_unit if units else counts.units_total) * s.param_bytes
        gathered += counts.largest_unit_trainable * (s.param_bytes + s.reduce_bytes)
        rows.append((f"FSDP unsharded units ({s.param_bytes * 8}-bit weights, 1 unit's grads)", gathered,
                     "the largest unit and its prefetch" if units else "every unit (reshard_after_forward false)"))
    else:
        p = counts.trainable + counts.frozen_network
        rows.append(("parameters, network (fp32)", 4 * p, where))
        rows.append(("gradients (fp32)", 4 * counts.trainable, where))
        rows.append((f"optimizer state ({s.optimizer_states} x fp32)", 4 * s.optimizer_states * counts.trainable,
                     where))
        if s.ddp:
            rows.append(("DDP gradient buckets (fp32)", 4 * counts.trainable, "replicated"))
        if s.autocast:
            rows.append(("autocast weight copies (bf16)", 2 * counts.trainable, "cached per forward"))
    rows.append(("frozen parts (autoencoder, audio encoder, loss extractors)", counts.frozen_parts_bytes, "replicated"))
    return rows


# ------------------------------------------------------------------------------------------------- activations
@dataclass
class ActivationTrace:
    peak: int  # bytes: the step's activation peak (forward + backward)
    forward_end: int  # live bytes when the loss is computed (what the backward pass starts from)
    largest: int  # the largest single storage


def trace_training_step(module: nn.Module, batch: dict[str, Any], settings: MemorySettings,
                        layout: Layout | None = None) -> ActivationTrace:
    """Run ``module.diffusion_loss`` and its backward under :class:`LiveMemory` (and :func:`fused_attention` on the
    meta device); parameter gradients are dropped as soon as they are accumulated (the states count them)."""
    params = list(module.parameters())
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
             for p in params if p.requires_grad]
    attention = fused_attention() if batch["video"].device.type == "meta" else contextlib.nullcontext()
    mem = LiveMemory(exclude=params + list(module.buffers()))
    state = random.getstate()
    random.seed(0)  # the step's host draws (condition dropout, timesteps): the same estimate every time
    try:
        with attention, mem:
            loss, _ = module.diffusion_loss(batch, generator=None, training=True)
            forward_end = mem.live
            loss.backward()
    finally:
        random.setstate(state)
        for h in hooks:
            h.remove()
    return ActivationTrace(peak=mem.peak, forward_end=forward_end, largest=mem.largest)


# ---------------------------------------------------------------------------------------------------- phases
@dataclass
class PhaseShape:
    name: str
    spec: Any  # PhaseSpec or None (no curriculum)
    batch_size: int
    num_frames: int
    resolution: Any
    fps: float


def phase_shapes(cfg: Any) -> list[PhaseShape]:
    """The run's distinct training shapes: one per curriculum phase (its clip length), or the run's data shape."""
    from omegaconf import OmegaConf

    from halfbody.phases.spec import PhaseSpec

    data = cfg.data
    res = OmegaConf.to_container(data.resolution) if OmegaConf.is_config(data.resolution) else data.resolution
    curriculum = (cfg.get("callbacks") or {}).get("curriculum") if cfg.get("callbacks") else None
    phases = OmegaConf.to_container(curriculum.phases, resolve=True) if curriculum is not None else []
    if not phases:
        return [PhaseShape("run", None, int(data.batch_size), int(data.num_frames), res, float(data.fps))]
    out = []
    for i, p in enumerate(phases):
        spec = PhaseSpec.from_config(p, i)
        frames = spec.num_frames if spec.num_frames is not None else int(data.num_frames)
        out.append(PhaseShape(spec.name, spec, int(data.batch_size), int(frames), res, float(data.fps)))
    return out


# ---------------------------------------------------------------------------------------------------- estimate
@dataclass
class PhaseEstimate:
    phase: str
    shape: str
    rows: list[tuple[str, int, str]]
    total: int
    gpu_bytes: int
    trainable: int
    activation_checkpointing: bool

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes

    def table(self) -> str:
        lines = [f"phase {self.phase} ({self.shape}; {self.trainable / 1e6:,.0f} M trainable parameters; "
                 f"activation checkpointing {'on' if self.activation_checkpointing else 'off'})",
                 f"  {'component':<62} {'GiB':>8}  how"]
        for name, b, how in self.rows:
            lines.append(f"  {name:<62} {b / GIB:8.2f}  {how}")
        lines.append(f"  {'total per GPU':<62} {self.total / GIB:8.2f}")
        verdict = "fits" if self.fits else "does not fit"
        lines.append(f"  verdict: {verdict} on a {self.gpu_bytes / GIB:.0f} GiB GPU "
                     f"({(self.gpu_bytes - self.total) / GIB:+.2f} GiB headroom)")
        return "\n".join(lines)


def compute_in(network: nn.Module, dtype: torch.dtype) -> None:
    """The network's weights in ``dtype``, its floating inputs cast to it and its outputs returned in float32: what
    FSDP2's mixed-precision policy does at the root (gathered weights in ``param_dtype``, ``output_dtype`` float32)."""
    network.to(dtype)

    def cast(x, to):
        return x.to(to) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def pre(_m, args, kwargs):
        from torch.utils._pytree import tree_map

        return tree_map(lambda x: cast(x, dtype), args), tree_map(lambda x: cast(x, dtype), kwargs)

    def post(_m, _args, _kwargs, out):
        from torch.utils._pytree import tree_map

        return tree_map(lambda x: cast(x, torch.float32), out)

    network.register_forward_pre_hook(pre, with_kwargs=True)
    network.register_forward_hook(post, with_kwargs=True)


def _apply_activation_checkpointing(module: nn.Module, layout: Layout, on: bool) -> None:
    """The family's own switches: ``parallelize.activation_checkpointing`` on the family's blocks; a network's
    built-in ``gradient_checkpointing`` flag stays as configured (parallelize turns it off when it checkpoints)."""
    from halfbody.models.parallel import apply_activation_checkpointing

    if on:
        if getattr(module.network, "gradient_checkpointing", False):
            module.network.gradient_checkpointing = False
        apply_activation_checkpointing(layout.blocks)


def estimate(cfg: Any, gpu_gib: float = 80.0, reserved_gib: float = 1.5,
             phases: Sequence[str] | None = None) -> list[PhaseEstimate]:
    """Per-GPU memory of every distinct phase of the run ``cfg`` (a composed train config)."""
    settings = MemorySettings.from_config(cfg)
    module = build_module_on_meta(cfg)
    layout = family_layout(module)
    ac = settings.activation_checkpointing or bool(getattr(module.network, "gradient_checkpointing", False))
    _apply_activation_checkpointing(module, layout, settings.activation_checkpointing)
    if settings.param_bytes != 4:
        compute_in(module.network, settings.compute_dtype)
    results: list[PhaseEstimate] = []
    traced: dict[tuple, ActivationTrace] = {}
    for shape in phase_shapes(cfg):
        if phases and shape.name not in phases:
            continue
        if shape.spec is not None:
            module.apply_phase(shape.spec)
        counts = count_states(module, layout)
        key = (shape.num_frames, tuple(sorted(n for n, p in module.network.named_parameters() if p.requires_grad)),
               getattr(shape.spec, "muted", ()), module.audio_region, json.dumps(getattr(shape.spec, "losses", {}),
                                                                                   sort_keys=True, default=str))
        if key not in traced:
            batch = training_batch(module, shape.batch_size, shape.num_frames, shape.resolution, shape.fps)
            traced[key] = trace_training_step(module, batch, settings, layout)
        act = traced[key]
        rows = state_rows(counts, settings)
        rows.append(("activations: forward + backward peak (simulated at this shape)", act.peak,
                     f"{act.forward_end / GIB:.2f} GiB live when the backward starts"))
        rows.append(("CUDA context, NCCL buffers, allocator slack (fixed)", int(reserved_gib * GIB),
                     "memory.reserved_gib"))
        total = sum(r[1] for r in rows)
        res = shape.resolution
        res_s = f"{res}x{res}" if isinstance(res, int) else "x".join(str(v) for v in res)
        results.append(PhaseEstimate(
            phase=shape.name, shape=f"batch {shape.batch_size} x {shape.num_frames} frames x {res_s}",
            rows=rows, total=total, gpu_bytes=int(gpu_gib * GIB), trainable=counts.trainable,
            activation_checkpointing=ac))
    return results


# --------------------------------------------------------------------------------------------- CPU measurement
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measured_cpu_peak(fn: Callable[[], Any]) -> int:
    """Bytes by which this process's peak resident memory rises above its resident memory while ``fn`` runs (Linux:
    the peak is reset through ``/proc/self/clear_refs``; glibc is told to map every allocation of 64 KiB or more on
    its own, so a freed tensor leaves the resident set at once). A measurement of the real step on CPU."""
    import ctypes
    import gc

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed (no dynamic raise), so large blocks are unmapped on free
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    gc.collect()
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def summary_json(results: Sequence[PhaseEstimate]) -> list[dict[str, Any]]:
    return [{"phase": r.phase, "shape": r.shape, "total_gib": round(r.total / GIB, 3), "fits": r.fits,
             "gpu_gib": round(r.gpu_bytes / GIB, 1), "activation_checkpointing": r.activation_checkpointing,
             "rows": [{"component": n, "gib": round(b / GIB, 3), "how": h} for n, b, h in r.rows]} for r in results]


def worst(results: Sequence[PhaseEstimate]) -> PhaseEstimate:
    return max(results, key=lambda r: r.total)


__all__ = ["REFERENCE_CONFIGS", "pretrained_architectures", "build_module_on_meta", "family_layout", "fused_attention",
           "LiveMemory", "training_batch", "MemorySettings", "count_states", "state_rows", "trace_training_step",
           "phase_shapes", "estimate", "PhaseEstimate", "measured_cpu_peak", "summary_json", "worst", "GIB"]
