"""Identities of the synthetic talker world: a fixed palette, fixed proportions and a fixed voice.

Colour rules (the oracle metrics in ``halfbody.metrics.oracle`` rely on them):

- The mouth interior is :data:`MOUTH_COLOR`, the same dark red for every identity.
- The two gloves are the only strongly saturated *and* bright colours of a person
  (HSV saturation > :data:`GLOVE_MIN_SATURATION` and value > :data:`GLOVE_MIN_VALUE`), so they can be
  found in a reference image without keypoints. The person's right glove is on the image left in the
  neutral reference pose, the left glove on the image right (COCO-WholeBody "left" is the person's left).
- The core colours (background, skin, hair, shirt, eye white, pupil) are pairwise at least
  :data:`MIN_COLOR_DISTANCE` apart (Euclidean, unit RGB); each glove is at least :data:`MIN_GLOVE_DISTANCE`
  and the mouth interior at least :data:`MIN_MOUTH_DISTANCE` from every other colour, derived shades
  (sleeves, lips, neck, nose, brows) included.
"""

from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass

import numpy as np

MOUTH_COLOR = (0.50, 0.04, 0.10)  # shared mouth-interior colour (unit RGB)
EYE_WHITE = (0.97, 0.97, 0.96)
PUPIL = (0.10, 0.09, 0.12)
GLOVE_MIN_SATURATION = 0.7
GLOVE_MIN_VALUE = 0.6
MIN_COLOR_DISTANCE = 0.22  # between the core colours (background, skin, hair, shirt, eye white, pupil)
MIN_GLOVE_DISTANCE = 0.42  # glove to every other colour, derived shades included
MIN_MOUTH_DISTANCE = 0.30  # mouth interior to every other colour, derived shades included
_CORE = ("background", "skin", "hair", "shirt", "eye_white", "pupil")
_IDENTITY_STREAM = 0x1D  # SeedSequence tag that separates identity randomness from clip randomness


@dataclass(frozen=True)
class Identity:
    """One cartoon person. Lengths are in half-body world units (fraction of the half-body frame width)."""

    name: str
    index: int
    # palette, unit RGB
    background: tuple[float, float, float]
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    shirt: tuple[float, float, float]
    glove_left: tuple[float, float, float]
    glove_right: tuple[float, float, float]
    # proportions
    head_width: float  # full head width (world units): 0.36-0.44, chibi
    head_aspect: float  # head ry / rx
    hair_volume: float
    bangs_depth: float
    long_hair: bool
    shoulder_half_width: float
    eye_spacing: float  # head-local units (fraction of head rx)
    eye_size: float
    mouth_width: float  # head-local half-width of the mouth
    mouth_y: float  # head-local vertical position of the mouth centre
    mouth_max_open: float  # head-local inner half-height at envelope 1
    hand_length: float  # wrist to middle fingertip, world units
    # voice
    f0: float
    harmonics: tuple[float, ...]
    vibrato_rate: float
    vibrato_depth: float
    syllable_rate: float  # mean syllables per second (3-6 Hz)

    # derived shades (deterministic functions of the palette)
    @property
    def sleeve(self) -> tuple[float, float, float]:
        return _scale(self.shirt, 0.72)

    @property
    def lips(self) -> tuple[float, float, float]:
        return _mix(self.skin, (0.85, 0.33, 0.40), 0.45)

    @property
    def neck(self) -> tuple[float, float, float]:
        return _scale(self.skin, 0.88)

    @property
    def nose(self) -> tuple[float, float, float]:
        return _scale(self.skin, 0.86)

    @property
    def brows(self) -> tuple[float, float, float]:
        return _scale(self.hair, 0.75)

    def palette(self) -> dict[str, tuple[float, float, float]]:
        """Every colour this person is drawn with, by name (unit RGB)."""
        return {
            "background": self.background, "skin": self.skin, "hair": self.hair, "shirt": self.shirt,
            "glove_left": self.glove_left, "glove_right": self.glove_right, "sleeve": self.sleeve,
            "lips": self.lips, "neck": self.neck, "nose": self.nose, "brows": self.brows,
            "eye_white": EYE_WHITE, "pupil": PUPIL, "mouth": MOUTH_COLOR,
        }

    def palette_uint8(self) -> dict[str, list[int]]:
        return {k: [int(round(c * 255)) for c in v] for k, v in self.palette().items()}

    def to_json(self) -> dict:
        d = asdict(self)
        d["palette"] = self.palette_uint8()
        for k in ("background", "skin", "hair", "shirt", "glove_left", "glove_right"):
            d.pop(k)
        d["harmonics"] = [round(h, 5) for h in self.harmonics]
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in d.items()}


def _scale(c, s):
    return tuple(float(min(1.0, x * s)) for x in c)


def _mix(a, b, t):
    return tuple(float((1 - t) * x + t * y) for x, y in zip(a, b))


def _hsv(h, s, v):
    return tuple(float(x) for x in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b)))


def _is_glove_like(c) -> bool:
    _, s, v = colorsys.rgb_to_hsv(*c)
    return s > GLOVE_MIN_SATURATION and v > GLOVE_MIN_VALUE


def palette_problems(identity: Identity) -> list[str]:
    """The colour rules of the module docstring that ``identity`` breaks (empty when valid)."""
    pal = identity.palette()
    problems = []
    names = list(pal)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pair = {a, b}
            if pair & {"glove_left", "glove_right"}:
                need = MIN_GLOVE_DISTANCE
            elif "mouth" in pair:
                need = MIN_MOUTH_DISTANCE
            elif pair <= set(_CORE):
                need = MIN_COLOR_DISTANCE
            else:
                continue
            if _dist(pal[a], pal[b]) < need:
                problems.append(f"{a}~{b}")
    for name, c in pal.items():
        if _is_glove_like(c) != name.startswith("glove"):
            problems.append(f"{name} glove-like={_is_glove_like(c)}")
    return problems


def make_identity(seed: int, index: int) -> Identity:
    """The ``index``-th identity of the world with this ``seed`` (pure function of both)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _IDENTITY_STREAM, int(index)]))
    # background hues on a golden-ratio walk so that consecutive identities differ strongly
    hue0 = float(np.random.default_rng([int(seed), _IDENTITY_STREAM]).random())
    bg_hue = (hue0 + 0.61803398875 * index) % 1.0
    for _ in range(500):
        background = _hsv(bg_hue + rng.uniform(-0.03, 0.03), rng.uniform(0.12, 0.32), rng.uniform(0.80, 0.95))
        tone = rng.uniform(0.0, 1.0)  # light to dark skin
        skin = _mix((1.0, 0.86, 0.74), (0.60, 0.40, 0.27), tone)
        skin = tuple(float(np.clip(x + rng.uniform(-0.03, 0.03), 0, 1)) for x in skin)
        hair = _hsv(rng.random(), rng.uniform(0.30, 0.65), rng.uniform(0.22, 0.58))
        shirt = _hsv(rng.random(), rng.uniform(0.35, 0.62), rng.uniform(0.50, 0.85))
        gh = rng.random()
        glove_right = _hsv(gh, rng.uniform(0.88, 1.0), rng.uniform(0.90, 1.0))
        glove_left = _hsv(gh + rng.uniform(0.3, 0.7), rng.uniform(0.88, 1.0), rng.uniform(0.90, 1.0))
        ident = Identity(
            name=f"sw{int(seed)}-{int(index):03d}", index=int(index),
            background=background, skin=skin, hair=hair, shirt=shirt,
            glove_left=glove_left, glove_right=glove_right,
            head_width=rng.uniform(0.36, 0.44), head_aspect=rng.uniform(1.0, 1.15),
            hair_volume=rng.uniform(1.06, 1.18), bangs_depth=rng.uniform(0.30, 0.55),
            long_hair=bool(rng.random() < 0.4), shoulder_half_width=rng.uniform(0.24, 0.30),
            eye_spacing=rng.uniform(0.34, 0.42), eye_size=rng.uniform(0.13, 0.17),
            mouth_width=rng.uniform(0.26, 0.32), mouth_y=rng.uniform(0.52, 0.58),
            mouth_max_open=rng.uniform(0.20, 0.25), hand_length=rng.uniform(0.13, 0.15),
            f0=rng.uniform(100.0, 250.0),
            harmonics=tuple(float(x) for x in (1.0, *(rng.uniform(0.25, 0.8, size=3) / np.arange(2, 5)))),
            vibrato_rate=rng.uniform(4.5, 6.5), vibrato_depth=rng.uniform(0.01, 0.03),
            syllable_rate=rng.uniform(3.5, 5.5),
        )
        if not palette_problems(ident):
            return ident
    raise RuntimeError(f"synthetic_world: no valid palette for seed={seed} identity={index} after 500 draws")
