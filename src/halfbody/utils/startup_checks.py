"""Start-up checks of a composed training config: user mistakes found in seconds, before any heavy work.

:func:`check_config` runs at the top of ``halfbody.train.train``, before the datamodule generates or reads data and
before the model is built. Each mistake raises a :class:`~halfbody.utils.errors.UserError` whose message is one line
naming the config key, its value and what was expected; the entry point prints it and exits with code 2.

Checked: numbers (``data.num_workers``, ``data.batch_size``, ``data.num_frames``, ``model.optimizer.lr`` / ``eps``
/ ``weight_decay``, ``trainer.max_steps``); the shard specs (missing or empty, a glob or brace pattern that matches
nothing, a folder without shards, files that are not tar archives); the checkpoints (``ckpt_path`` and
``model.init_checkpoint``: missing, empty, truncated, not a Lightning checkpoint, refused by safe loading, of the
other model family); and the clip geometry the autoencoder can take (``data.resolution`` divisible by its spatial
factor, ``data.num_frames`` and every curriculum phase's ``num_frames`` of the form ``1 + k * temporal factor``),
asked of the autoencoder config itself; ``parallelize.*`` against the trainer (under a sharded strategy such as
``trainer=fsdp``: ``trainer.precision`` 32-true or bf16-mixed and fp32 / bf16 FSDP dtypes, and no EMA callback; a
known ``compile_backend`` and a C++ compiler for inductor on the CPU; ``global_batch_size`` divisible by the process
count, with ``data.batch_size`` the quotient); a sharded checkpoint directory as ``ckpt_path`` only under a sharded
strategy.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import tarfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from halfbody.utils.errors import UserError

log = logging.getLogger(__name__)

_MISSING = object()


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _get(cfg: DictConfig, key: str, default: Any = _MISSING) -> Any:
    """``cfg``'s value at dotted ``key`` (resolved, plain); a missing mandatory value is a ``UserError``."""
    try:
        value = _plain(OmegaConf.select(cfg, key, default=default, throw_on_missing=True))
    except MissingMandatoryValue:
        raise UserError(f"{key} is not set (a required value, ??? in the config): give it on the command line, "
                        f"e.g. {key}=<value>") from None
    except InterpolationResolutionError as e:
        raise UserError(f"{key}: cannot resolve its value ({str(e).splitlines()[0]})") from None
    if value is _MISSING:
        raise UserError(f"{key} is missing from the config")
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------------------- numbers
def check_numbers(cfg: DictConfig) -> None:
    ints = [("data.num_workers", 0, "an integer >= 0 (0 loads data in the main process)"),
            ("data.batch_size", 1, "an integer >= 1"),
            ("data.num_frames", 1, "an integer >= 1"),
            ("trainer.max_steps", -1, "an integer (-1: no step limit)")]
    for key, low, expected in ints:
        v = _get(cfg, key, None)
        if v is not None and not (_is_int(v) and v >= low):
            raise UserError(f"{key}={v!r}: expected {expected}")
    opt = _get(cfg, "model.optimizer", None)
    if isinstance(opt, dict):
        for name, positive in (("lr", True), ("eps", True), ("weight_decay", False)):
            if name not in opt:
                continue
            v = opt[name]
            if not _is_number(v) or not (v > 0 if positive else v >= 0) or v != v:
                what = "a positive number (e.g. 1e-4)" if positive else "a number >= 0"
                raise UserError(f"model.optimizer.{name}={v!r}: expected {what}")


# ---------------------------------------------------------------------------------------------------------- shards
def _is_remote(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def _is_tar(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def check_shards(spec: Any, key: str) -> list[str]:
    """The local shard files of ``spec`` (config key ``key``), each checked to exist and be a tar archive."""
    from halfbody.data.datamodule import expand_shards

    if spec is None:
        return []
    items = spec if isinstance(spec, list) else [spec]
    if not items or any(isinstance(s, str) and not s.strip() for s in items):
        raise UserError(f"{key}={spec!r} is empty: expected a shard folder, a brace pattern "
                        "(/data/train-{000000..000099}.tar), a glob or a list of them")
    try:
        shards = expand_shards(spec, key)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    local = [s for s in shards if not _is_remote(s)]
    if not local:
        return []
    not_tar = [s for s in local if not _is_tar(s)]
    if len(not_tar) == len(local):
        raise UserError(f"{key}={spec!r}: none of its {len(local)} file(s) is a tar archive (e.g. {not_tar[0]!r}): "
                        "expected webdataset .tar shards")
    if not_tar:
        log.warning("%s: %d of %d shard(s) are not tar archives and yield no samples (e.g. %r)", key, len(not_tar),
                    len(local), not_tar[0])
    return local


def check_data(cfg: DictConfig) -> None:
    if _get(cfg, "data.prepare", None) is not None:
        return  # the data are generated by data.prepare (the synthetic world) before they are read
    check_shards(_get(cfg, "data.train_shards"), "data.train_shards")
    check_shards(_get(cfg, "data.val_shards", None), "data.val_shards")


# ---------------------------------------------------------------------------------------------------------- checkpoints
def check_checkpoints(cfg: DictConfig) -> None:
    from halfbody.utils.checkpoint_io import SPECIAL_CKPT_PATHS, check_checkpoint_family, inspect_checkpoint

    model_target = _get(cfg, "model._target_", None)
    for key, resume in (("ckpt_path", True), ("model.init_checkpoint", False)):
        path = _get(cfg, key, None)
        if path is None or path == "":
            continue
        if not isinstance(path, str):
            raise UserError(f"{key}={path!r}: expected the path of a Lightning .ckpt file")
        if (resume and path in SPECIAL_CKPT_PATHS) or _is_remote(path):
            continue
        ckpt = inspect_checkpoint(path, key, resume=resume, sharded_ok=resume and sharded_strategy(cfg))
        check_checkpoint_family(ckpt, path, key, model_target)


# ---------------------------------------------------------------------------------------------------------- geometry
def autoencoder_factors(ae_cfg: dict | None) -> tuple[int, int] | None:
    """``(spatial_factor, temporal_factor)`` of the autoencoder config, without loading weights (None: unknown).

    The patch autoencoder is built (it has no weights); the diffusers VAEs are asked through their ``config.json``
    (the LTX VAE is built on the meta device, so its own code computes its compression ratios).
    """
    if not isinstance(ae_cfg, dict) or "_target_" not in ae_cfg:
        return None
    target = str(ae_cfg["_target_"])
    cls_name = target.rsplit(".", 1)[-1]
    try:
        if cls_name == "PatchAutoencoder":
            import hydra

            ae = hydra.utils.instantiate(ae_cfg)
            return int(ae.spatial_factor), int(ae.temporal_factor)
        path = ae_cfg.get("path")
        config = Path(str(path)) / "config.json" if path else None
        if config is None or not config.is_file():
            return None  # the model's loader names the missing key
        if cls_name == "KLAutoencoder":
            blocks = json.loads(config.read_text())["block_out_channels"]
            return 2 ** (len(blocks) - 1), 1
        if cls_name == "LTXVideoAutoencoder":
            import torch
            from diffusers import AutoencoderKLLTXVideo

            with torch.device("meta"):
                vae = AutoencoderKLLTXVideo.from_config(AutoencoderKLLTXVideo.load_config(str(path)))
            return int(vae.spatial_compression_ratio), int(vae.temporal_compression_ratio)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the model build reports a broken autoencoder config in full
        log.debug("autoencoder factors unknown for %s: %s", target, e)
    return None


def check_clip_geometry(cfg: DictConfig) -> None:
    from halfbody.data.transforms import parse_resolution

    ae_cfg = _get(cfg, "model.autoencoder", None)
    factors = autoencoder_factors(ae_cfg)
    resolution = _get(cfg, "data.resolution", None)
    if resolution is not None:
        try:
            h, w = parse_resolution(resolution)
        except (ValueError, TypeError) as e:
            raise UserError(f"data.{e}") from None
    if factors is None:
        return
    spatial, temporal = factors
    name = ae_cfg["_target_"].rsplit(".", 1)[-1]
    from halfbody.models.families import family_class  # the family declares the autoencoder it needs

    family = family_class(_get(cfg, "model._target_", None))
    if family is not None and not family.VIDEO_AUTOENCODER and temporal != 1:
        raise UserError(f"model.autoencoder={name} (temporal factor {temporal}): {family.TITLE} denoises frame by "
                        "frame and needs an image autoencoder (temporal factor 1), e.g. model/autoencoder=patch")
    if family is not None and family.VIDEO_AUTOENCODER and temporal == 1:
        raise UserError(f"model.autoencoder={name} (temporal factor 1): {family.TITLE} needs a causal video "
                        "autoencoder (temporal factor > 1), e.g. model/autoencoder=patch_causal")
    if resolution is not None and (h % spatial or w % spatial):
        raise UserError(f"data.resolution={resolution!r}: the autoencoder ({name}) needs height and width divisible "
                        f"by {spatial}")
    if temporal <= 1:
        return
    lengths = [("data.num_frames", _get(cfg, "data.num_frames", None))]
    phases = _get(cfg, "callbacks.curriculum.phases", None)
    if isinstance(phases, list):
        for i, phase in enumerate(phases):
            if isinstance(phase, dict) and phase.get("num_frames") is not None:
                label = phase.get("name", i)
                lengths.append((f"callbacks.curriculum.phases[{i}].num_frames (phase {label!r})", phase["num_frames"]))
    for key, n in lengths:
        if n is not None and (not _is_int(n) or n < 1 or (n - 1) % temporal):
            examples = ", ".join(str(1 + k * temporal) for k in (1, 2, 3))
            raise UserError(f"{key}={n!r}: the causal autoencoder ({name}) needs 1 + k*{temporal} frames "
                            f"(e.g. {examples})")


# ---------------------------------------------------------------------------------------------------------- parallelism
def sharded_strategy(cfg: DictConfig) -> bool:
    """Whether ``trainer.strategy`` shards the model (Lightning's ``ModelParallelStrategy``, e.g. ``trainer=fsdp``)."""
    strategy = _get(cfg, "trainer.strategy", None)
    target = strategy.get("_target_") if isinstance(strategy, dict) else None
    if not target:
        return False
    try:
        import hydra
        from lightning.pytorch.strategies import ModelParallelStrategy

        return issubclass(hydra.utils.get_class(str(target)), ModelParallelStrategy)
    except Exception:  # noqa: BLE001 - an unknown strategy target: Lightning names it
        return False


def _process_count(cfg: DictConfig) -> int | None:
    devices, nodes = _get(cfg, "trainer.devices", None), _get(cfg, "trainer.num_nodes", 1)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, list):
        devices = len(devices)
    if not _is_int(devices) or devices < 1 or not _is_int(nodes) or nodes < 1:
        return None  # "auto" / -1: Lightning decides
    return int(devices) * int(nodes)


def check_parallelism(cfg: DictConfig) -> None:
    """``parallelize.*`` against the trainer: precision under FSDP, the compile backend, the global batch split."""
    par = _get(cfg, "parallelize", None)
    if not isinstance(par, dict):
        return
    fsdp = par.get("fsdp") or {}
    if sharded_strategy(cfg):
        for name in cfg.get("callbacks") or {}:
            target = str(OmegaConf.select(cfg, f"callbacks.{name}._target_", default=""))
            if target.endswith("EMAWeights"):
                raise UserError(f"callbacks.{name}={target}: the EMA of the weights does not support "
                                "trainer=fsdp yet (its copy of the training weights is not saved sharded, so a resumed "
                                f"run would lose it); remove it with ~callbacks.{name}")
        precision = str(_get(cfg, "trainer.precision", "32-true"))
        if precision not in ("32-true", "32", "bf16-mixed"):
            raise UserError(f"trainer.precision={precision}: under trainer=fsdp the mixed precision is the FSDP2 policy "
                            "(parallelize.fsdp.param_dtype / reduce_dtype: bf16 parameters, fp32 reduction by "
                            "default); use trainer.precision=32-true")
        for name in ("param_dtype", "reduce_dtype"):
            v = fsdp.get(name)
            if str(v).lower() not in ("fp32", "float32", "bf16", "bfloat16"):
                raise UserError(f"parallelize.fsdp.{name}={v!r}: expected fp32 or bf16 (fp16 needs loss scaling, "
                                "which the FSDP2 path does not run)")
    if par.get("compile"):
        backend = str(par.get("compile_backend", "inductor"))
        import torch._dynamo

        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise UserError(f"parallelize.compile_backend={backend!r}: not a torch.compile backend; expected one of "
                            f"{sorted(torch._dynamo.list_backends())}")
        accelerator = str(_get(cfg, "trainer.accelerator", "auto"))
        import torch

        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        if backend == "inductor" and on_cpu:
            import shutil

            cxx = os.environ.get("CXX", "g++")
            if shutil.which(cxx) is None and shutil.which("c++") is None:
                raise UserError(f"parallelize.compile=true with compile_backend=inductor on the CPU needs a C++ "
                                f"compiler ({cxx} not found); install one, or use parallelize.compile_backend=aot_eager")
    total = par.get("global_batch_size")
    if total is not None:
        if not _is_int(total) or total < 1:
            raise UserError(f"parallelize.global_batch_size={total!r}: expected an integer >= 1 (or null)")
        procs = _process_count(cfg)
        accumulate = _get(cfg, "trainer.accumulate_grad_batches", 1) or 1
        if procs is not None:
            per = procs * int(accumulate)
            what = (f"trainer.devices x trainer.num_nodes = {procs} process(es)" +
                    (f" x trainer.accumulate_grad_batches={accumulate}" if accumulate != 1 else ""))
            if total % per:
                raise UserError(f"parallelize.global_batch_size={total}: not divisible by {what}; choose a device "
                                "count that divides the batch")
            batch = _get(cfg, "data.batch_size", None)
            if batch is not None and batch != total // per:
                raise UserError(f"data.batch_size={batch}: parallelize.global_batch_size={total} over {what} is "
                                f"{total // per} per process; set data.batch_size={total // per}")


def check_config(cfg: DictConfig) -> None:
    """Every start-up check above; raises the first ``UserError`` found."""
    check_numbers(cfg)
    check_parallelism(cfg)
    check_clip_geometry(cfg)
    check_checkpoints(cfg)
    check_data(cfg)
