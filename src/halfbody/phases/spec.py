"""Declarative training phases and curricula (shared/DESIGN.md §2: phases are data).

A phase is one :class:`PhaseSpec`, built from a plain Hydra mapping; a :class:`Curriculum` is their ordered list.
Nothing here knows a model family: a LightningModule applies a spec to itself (``apply_phase``), the datamodule
applies the data-side fields to its samples, and :class:`~halfbody.phases.callback.CurriculumCallback` moves the
run through the phases by ``global_step``.

YAML shape of one phase (every key but ``name``, ``steps`` and ``trainable`` is optional)::

    - name: audio_lips                  # unique within the curriculum; logged as the phase's name
      steps: 10000                      # optimizer steps in this phase (> 0)
      trainable: [denoising_unet, pose_encoder, audio_attention]   # module groups that train; the rest is frozen
      muted: []                         # module groups whose effect is switched off (e.g. [audio_attention])
      pose_groups: no_lips              # keypoints.POSE_PRESETS name or a list of keypoints.KEYPOINT_GROUPS
      pose_dropout: {start: 0.0, end: 0.2}   # or a number; per-sample pose-condition dropout (model side)
      audio_region: lips                # off | lips | head | face | global (family-specific values)
      data: {kinds: [headshot], headshot: pad, mask_margins: {head: 0.3}, framing: full}   # ConditionSpec fields
      num_frames: 24                    # clip length
      losses: {...}                     # opaque: handed to the model, which interprets it

Optional fields left out (``null``) mean "the run's configured value" (``model.audio_region``,
``model.condition_dropout.pose``, ``data.condition.*``, ``data.num_frames``), never "the previous phase's value":
every phase is a pure function of its own spec, so a run resumed in any phase is configured exactly as it was.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from halfbody.data.conditions import ConditionSpec
from halfbody.data.keypoints import resolve_pose_groups
from halfbody.utils.containers import to_plain

PHASE_KEYS = ("name", "steps", "trainable", "muted", "pose_groups", "pose_dropout", "audio_region", "data",
              "num_frames", "losses")
DATA_KEYS = ("kinds", "headshot", "mask_margins", "framing")


def _names(value: Any, what: str, phase: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"phase {phase!r}: {what}={value!r} must be a list of module-group names")
    if len(set(value)) != len(value):
        raise ValueError(f"phase {phase!r}: {what}={list(value)!r} lists a group twice")
    return tuple(value)


@dataclass(frozen=True)
class LinearSchedule:
    """A value ramped linearly over a phase: ``start`` at its first step, ``end`` at its last step (and after)."""

    start: float
    end: float

    def at(self, step_in_phase: int, steps: int) -> float:
        if steps <= 1:
            return float(self.end)
        frac = min(max(step_in_phase, 0) / (steps - 1), 1.0)
        return float(self.start + (self.end - self.start) * frac)


def _probability_schedule(value: Any, what: str, phase: str) -> float | LinearSchedule | None:
    """``None``, a number, or ``{start, end}`` with values in ``[0, 1]``."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        keys = set(value)
        if keys != {"start", "end"}:
            raise ValueError(f"phase {phase!r}: {what}={dict(value)!r} must be a number or {{start: p0, end: p1}}")
        vals = (value["start"], value["end"])
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        vals = (value,)
    else:
        raise ValueError(f"phase {phase!r}: {what}={value!r} must be a number or {{start: p0, end: p1}}")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"phase {phase!r}: {what}={to_plain(value)!r} must lie in [0, 1]")
    if len(vals) == 1:
        return float(vals[0])
    return LinearSchedule(float(vals[0]), float(vals[1]))


@dataclass(frozen=True)
class PhaseSpec:
    """One training phase (see the module docstring for the YAML shape).

    Attributes:
        name: unique name (logs, checkpoints, error messages).
        steps: optimizer steps in the phase.
        trainable: module groups (``module.module_groups()`` keys) that train; every other group is frozen.
        muted: module groups whose effect is switched off (which groups can be muted is the family's choice).
        pose_groups: pose preset or keypoint-group list rendered into the pose map; None: ``data.condition``.
        pose_dropout: per-sample pose dropout probability, a number or a :class:`LinearSchedule`; None: the
            model's configured ``condition_dropout.pose``.
        audio_region: where audio acts; None: the model's configured region (muting the audio group wins).
        data: ``ConditionSpec`` fields ``kinds``, ``headshot``, ``mask_margins``, ``framing``; missing keys:
            ``data.condition``.
        num_frames: clip length; None: ``data.num_frames``.
        losses: opaque mapping handed to the model (loss terms, weights, timestep bands).
    """

    name: str
    steps: int
    trainable: tuple[str, ...]
    muted: tuple[str, ...] = ()
    pose_groups: str | tuple[str, ...] | None = None
    pose_dropout: float | LinearSchedule | None = None
    audio_region: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    num_frames: int | None = None
    losses: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | PhaseSpec, index: int = 0) -> PhaseSpec:
        """A plain (or OmegaConf) mapping -> a validated spec; errors name the phase and the bad value."""
        if isinstance(cfg, PhaseSpec):
            return cfg
        if not isinstance(cfg, Mapping):
            raise ValueError(f"phases[{index}] must be a mapping with name, steps, trainable, ...; got {cfg!r}")
        cfg = to_plain(cfg)
        name = cfg.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"phases[{index}].name={name!r} must be a non-empty string")
        unknown = sorted(set(cfg) - set(PHASE_KEYS))
        if unknown:
            raise ValueError(f"phase {name!r}: unknown key(s) {unknown}; known: {list(PHASE_KEYS)}")
        steps = cfg.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"phase {name!r}: steps={steps!r} must be an integer > 0")
        if "trainable" not in cfg:
            raise ValueError(f"phase {name!r}: trainable is missing (the module groups that train in this phase)")
        trainable = _names(cfg["trainable"], "trainable", name)
        if not trainable:
            raise ValueError(f"phase {name!r}: trainable=[] leaves nothing to train")
        muted = _names(cfg.get("muted"), "muted", name)
        both = [g for g in muted if g in trainable]
        if both:
            raise ValueError(f"phase {name!r}: group(s) {both} are both trainable and muted (a muted group gets no "
                             f"gradient)")

        pose_groups = cfg.get("pose_groups")
        if pose_groups is not None:
            if not isinstance(pose_groups, str):
                if not isinstance(pose_groups, list) or not all(isinstance(g, str) for g in pose_groups):
                    raise ValueError(f"phase {name!r}: pose_groups={pose_groups!r} must be a preset name or a list")
                pose_groups = tuple(pose_groups)
            try:
                resolve_pose_groups(pose_groups)
            except ValueError as e:
                raise ValueError(f"phase {name!r}: pose_groups={to_plain(pose_groups)!r}: {e}") from None

        audio_region = cfg.get("audio_region")
        if audio_region is not None and not isinstance(audio_region, str):
            raise ValueError(f"phase {name!r}: audio_region={audio_region!r} must be a string")

        data = cfg.get("data") or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"phase {name!r}: data={data!r} must be a mapping of {list(DATA_KEYS)}")
        bad = sorted(set(data) - set(DATA_KEYS))
        if bad:
            raise ValueError(f"phase {name!r}: unknown data key(s) {bad}; known: {list(DATA_KEYS)}")
        try:  # the ConditionSpec checks values (kinds, headshot mode, margins) with one-line errors
            ConditionSpec(**{k: v for k, v in data.items() if v is not None})
        except ValueError as e:
            raise ValueError(f"phase {name!r}: data: {e}") from None

        num_frames = cfg.get("num_frames")
        if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)
                                       or num_frames <= 0):
            raise ValueError(f"phase {name!r}: num_frames={num_frames!r} must be an integer > 0")
        losses = cfg.get("losses") or {}
        if not isinstance(losses, Mapping):
            raise ValueError(f"phase {name!r}: losses={losses!r} must be a mapping")
        return cls(name=name, steps=steps, trainable=trainable, muted=muted, pose_groups=pose_groups,
                   pose_dropout=_probability_schedule(cfg.get("pose_dropout"), "pose_dropout", name),
                   audio_region=audio_region, data={k: v for k, v in data.items() if v is not None},
                   num_frames=num_frames, losses=dict(losses))

    # ------------------------------------------------------------------------------------ derived values
    def pose_dropout_at(self, step_in_phase: int) -> float | None:
        """The scheduled pose dropout at ``step_in_phase`` (None: the model's configured value)."""
        if isinstance(self.pose_dropout, LinearSchedule):
            return self.pose_dropout.at(step_in_phase, self.steps)
        return self.pose_dropout

    def data_fields(self) -> dict[str, Any]:
        """The data-side fields (what the datamodule applies), ``None`` for "the configured value"; equal dicts
        mean the datamodule renders the same samples, so a phase change that keeps them needs no data change."""
        return {"pose_groups": self.pose_groups, **{k: self.data.get(k) for k in DATA_KEYS},
                "num_frames": self.num_frames}

    def summary(self) -> dict[str, Any]:
        """Plain values for loggers (W&B config / CSV hparams)."""
        pd = self.pose_dropout
        return {
            "name": self.name, "steps": self.steps, "trainable": list(self.trainable), "muted": list(self.muted),
            "pose_groups": self.pose_groups if isinstance(self.pose_groups, (str, type(None))) else list(self.pose_groups),
            "pose_dropout": {"start": pd.start, "end": pd.end} if isinstance(pd, LinearSchedule) else pd,
            "audio_region": self.audio_region, "data": to_plain(self.data), "num_frames": self.num_frames,
            "losses": to_plain(self.losses),
        }


class Curriculum:
    """An ordered list of phases over consecutive ranges of optimizer steps.

    Phase ``i`` covers global steps ``[start_i, start_i + steps_i)``. After the last phase's range the run stays
    in the last phase (``step_in_phase`` keeps counting and schedules hold their end values), so ``max_steps``
    beyond :attr:`total_steps` just trains the last phase longer.
    """

    def __init__(self, phases: Iterable[PhaseSpec | Mapping[str, Any]]):
        if isinstance(phases, Mapping) or isinstance(phases, (str, bytes)):
            raise ValueError(f"phases must be a list of phase mappings, got {type(phases).__name__}")
        self.phases: tuple[PhaseSpec, ...] = tuple(PhaseSpec.from_config(p, i) for i, p in enumerate(phases))
        if not self.phases:
            raise ValueError("phases=[]: a curriculum needs at least one phase")
        seen: set[str] = set()
        for p in self.phases:
            if p.name in seen:
                raise ValueError(f"phase name {p.name!r} is used twice; phase names must be unique")
            seen.add(p.name)
        starts, total = [], 0
        for p in self.phases:
            starts.append(total)
            total += p.steps
        self.starts: tuple[int, ...] = tuple(starts)
        self.total_steps: int = total

    def __len__(self) -> int:
        return len(self.phases)

    def __getitem__(self, index: int) -> PhaseSpec:
        return self.phases[index]

    def phase_at(self, global_step: int) -> tuple[int, PhaseSpec, int]:
        """``(index, spec, step_in_phase)`` of the phase that trains optimizer step ``global_step`` (0-based)."""
        if global_step < 0:
            raise ValueError(f"global_step={global_step} must be >= 0")
        index = bisect_right(self.starts, global_step) - 1
        return index, self.phases[index], global_step - self.starts[index]

    def index_of(self, name: str) -> int:
        for i, p in enumerate(self.phases):
            if p.name == name:
                return i
        raise KeyError(f"no phase named {name!r}; phases: {[p.name for p in self.phases]}")


# ---------------------------------------------------------------------------------------- applying helpers
def check_group_names(spec: PhaseSpec, groups: Iterable[str], mutable: Iterable[str], owner: str) -> None:
    """Raise when ``spec`` names a module group that ``owner`` does not have or cannot mute."""
    groups, mutable = tuple(groups), tuple(mutable)
    for g in spec.trainable:
        if g not in groups:
            raise ValueError(f"phase {spec.name!r}: trainable group {g!r} is not a module group of {owner}; "
                             f"groups: {list(groups)}")
    for g in spec.muted:
        if g not in groups:
            raise ValueError(f"phase {spec.name!r}: muted group {g!r} is not a module group of {owner}; "
                             f"groups: {list(groups)}")
        if g not in mutable:
            raise ValueError(f"phase {spec.name!r}: muted group {g!r} cannot be muted in {owner}; "
                             f"mutable groups: {list(mutable)}")


def set_trainable_groups(groups: Mapping[str, Sequence[nn.Module]], trainable: Iterable[str]) -> None:
    """``requires_grad`` on for the parameters of the ``trainable`` groups and off for every other group.

    Frozen parameters also lose their ``.grad`` (set to None): no gradient memory, and optimizers that skip
    parameters without a gradient (AdamW: no moment update, no weight decay) leave them bit-identical.
    """
    trainable = set(trainable)
    for name, modules in groups.items():
        on = name in trainable
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(on)
                if not on:
                    p.grad = None
