"""Parallelism applied from outside the models (torchtitan style): the settings and the three per-block steps.

A family's ``parallelize`` function (``halfbody.echomimic_v2.parallelize``, ``halfbody.mirrorme.parallelize``) lists
its blocks and calls, in this order (docs/ARCHITECTURE.md "Parallelism"):

1. :func:`apply_activation_checkpointing`: each block's forward runs under ``torch.utils.checkpoint`` (non-reentrant,
   RNG state preserved), so its activations are recomputed in the backward pass;
2. :func:`apply_compile`: ``nn.Module.compile`` on each block (in place: parameter names and state-dict keys stay);
3. :func:`apply_fsdp`: FSDP2 ``fully_shard`` on each block, then on the groups and the network root, with a
   :class:`~torch.distributed.fsdp.MixedPrecisionPolicy` (``param_dtype`` / ``reduce_dtype``) and optional CPU offload.

Models stay plain ``nn.Module`` s (no wrapper modules are inserted), so checkpoints have the same keys with or
without parallelism. Steps 1 and 2 work under every trainer (one device, DDP, FSDP); step 3 only with a device mesh
(``trainer=fsdp``: Lightning's ``ModelParallelStrategy``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(value: Any, key: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16`` (fp32 | bf16 | fp16); a ``ValueError`` naming ``key`` otherwise."""
    if isinstance(value, torch.dtype):
        return value
    if value is None or str(value).lower() not in DTYPES:
        raise ValueError(f"{key}={value!r}: expected one of fp32, bf16, fp16")
    return DTYPES[str(value).lower()]


@dataclass
class FSDPSettings:
    """``parallelize.fsdp``: how ``fully_shard`` is applied (only under ``trainer=fsdp``)."""

    reshard_after_forward: bool = True
    param_dtype: str = "bf16"
    reduce_dtype: str = "fp32"
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        parse_dtype(self.param_dtype, "parallelize.fsdp.param_dtype")
        parse_dtype(self.reduce_dtype, "parallelize.fsdp.reduce_dtype")


@dataclass
class Parallelism:
    """``cfg.parallelize`` (conf/parallelize/default.yaml): what the family's parallelize function applies."""

    activation_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    global_batch_size: int | None = None
    fsdp: FSDPSettings | Mapping[str, Any] = field(default_factory=FSDPSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.fsdp, FSDPSettings):
            fsdp = dict(self.fsdp or {})
            unknown = sorted(set(fsdp) - set(FSDPSettings.__dataclass_fields__))
            if unknown:
                raise ValueError(f"parallelize.fsdp has unknown key(s) {unknown}; known: "
                                 f"{sorted(FSDPSettings.__dataclass_fields__)}")
            self.fsdp = FSDPSettings(**fsdp)

    @classmethod
    def from_config(cls, cfg: "Parallelism | Mapping[str, Any] | None") -> "Parallelism":
        if isinstance(cfg, Parallelism):
            return cfg
        cfg = {k: v for k, v in dict(cfg or {}).items() if not str(k).startswith("_")}
        unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"parallelize has unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**cfg)

    def mixed_precision(self) -> tuple[torch.dtype, torch.dtype]:
        assert isinstance(self.fsdp, FSDPSettings)
        return (parse_dtype(self.fsdp.param_dtype, "parallelize.fsdp.param_dtype"),
                parse_dtype(self.fsdp.reduce_dtype, "parallelize.fsdp.reduce_dtype"))


# ------------------------------------------------------------------------------------------------------------ 1. AC
def _checkpointed_forward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # sampling / validation: nothing to recompute
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def is_checkpointed(block: nn.Module) -> bool:
    return getattr(block, "_halfbody_activation_checkpointing", False)


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> int:
    """Recompute each block's activations in the backward pass (non-reentrant ``torch.utils.checkpoint``).

    The block's ``forward`` is replaced on the instance (no wrapper module: names and keys stay); module hooks
    (FSDP2's unshard / reshard) stay outside the checkpointed region, as torchtitan's ``checkpoint_wrapper``.
    Returns the number of blocks newly checkpointed.
    """
    n = 0
    for block in blocks:
        if is_checkpointed(block):
            continue
        block.forward = functools.partial(_checkpointed_forward, block.forward)
        block._halfbody_activation_checkpointing = True
        n += 1
    return n


# ------------------------------------------------------------------------------------------------------- 2. compile
def is_compiled(block: nn.Module) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None


def apply_compile(blocks: Iterable[nn.Module], backend: str = "inductor") -> int:
    """``block.compile(backend=...)`` on each block (in place). Returns the number of blocks compiled."""
    n = 0
    for block in blocks:
        if not is_compiled(block):
            block.compile(backend=backend)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------- 3. FSDP
def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def apply_fsdp(units: Iterable[nn.Module], root: nn.Module, mesh, settings: Parallelism,
               forward_methods: Iterable[str] = (), cast_unit_inputs: bool = True) -> int:
    """FSDP2 ``fully_shard`` on each of ``units`` (blocks first, then the groups that hold them: children before
    parents), then on ``root``, whose remaining parameters form the root group.

    Every unit gathers its parameters in ``param_dtype`` and reduce-scatters gradients in ``reduce_dtype``; the root
    returns float32 (its ``output_dtype``), so losses are computed in full precision. ``forward_methods`` are
    methods of ``root`` other than ``forward`` that callers invoke directly (e.g. a reference encoder run once per
    clip when sampling): they get the root's FSDP hooks (``register_fsdp_forward_method``). ``cast_unit_inputs``
    False: only the root casts its floating inputs to ``param_dtype`` (FSDP2's cast rebuilds dataclass arguments,
    so a unit that writes into an argument object, as EchoMimicV2's reference attention writes its bank, needs the
    original). With ``param_dtype`` fp32 no policy is set at all (nothing to cast). Returns the number of units
    sharded (root included).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from torch.distributed.fsdp import register_fsdp_forward_method

    param_dtype, reduce_dtype = settings.mixed_precision()
    if param_dtype == torch.float32:
        param_dtype = None  # full precision: no casts (and no rebuilt arguments)
    if reduce_dtype == torch.float32:
        reduce_dtype = None  # gradients are reduced in their own dtype: float32 unless param_dtype is lower
    assert isinstance(settings.fsdp, FSDPSettings)
    offload = (CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if settings.fsdp.cpu_offload
               else OffloadPolicy())
    common = dict(mesh=mesh, reshard_after_forward=settings.fsdp.reshard_after_forward, offload_policy=offload)
    n = 0
    for unit in units:
        if is_sharded(unit) or not any(True for _ in unit.parameters()):
            continue
        fully_shard(unit, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                                         cast_forward_inputs=cast_unit_inputs), **common)
        n += 1
    fully_shard(root, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                                     output_dtype=None if param_dtype is None else torch.float32),
                **common)
    for name in forward_methods:
        _register_entry_method(root, name, register_fsdp_forward_method)
    return n + 1


def _register_entry_method(root: nn.Module, name: str, register) -> None:
    """``root.<name>`` gets the root's FSDP hooks (gather, input cast) when called from outside ``root.forward``;
    called from inside the forward (where the root is already gathered), it runs as is: FSDP2's own wrapper would
    reshard the root's parameters on return, under the forward that still needs them."""
    plain = getattr(type(root), name).__get__(root, type(root))
    register(root, name)
    hooked = getattr(root, name)
    depth = [0]

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    root.register_forward_pre_hook(enter)
    root.register_forward_hook(leave, always_call=True)

    @functools.wraps(plain)
    def entry(*args, **kwargs):
        return (plain if depth[0] > 0 else hooked)(*args, **kwargs)

    setattr(root, name, entry)


def parallelize_blocks(network: nn.Module, settings: Parallelism, mesh, *, blocks: list[nn.Module],
                       units: list[nn.Module], forward_methods: Iterable[str] = (),
                       cast_unit_inputs: bool = True) -> dict[str, int]:
    """The three steps in order: activation checkpointing and compile on ``blocks``, then (when ``mesh`` is given)
    ``fully_shard`` on ``units`` (children before parents) and on ``network``. Returns how many modules each step
    touched (logged by the caller)."""
    done = {"activation_checkpointing": 0, "compile": 0, "fully_shard": 0}
    if settings.activation_checkpointing:
        done["activation_checkpointing"] = apply_activation_checkpointing(blocks)
    if settings.compile:
        done["compile"] = apply_compile(blocks, settings.compile_backend)
    if mesh is not None:
        done["fully_shard"] = apply_fsdp(units, network, mesh, settings, forward_methods, cast_unit_inputs)
    return done
