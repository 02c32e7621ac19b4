"""Vectorised cartoon rasteriser and the half-body character rig.

Geometry lives in *world* units: the default half-body crop is the unit square (x right, y down, both
in fractions of the frame width). A :class:`Camera` maps world to pixels; a headshot is just a tighter
camera on the same rig. Every shape is a signed distance field evaluated only inside its bounding box,
with one-pixel anti-aliasing (``coverage = clip(0.5 - sdf_px, 0, 1)``), so a frame costs a few dozen
small numpy ops.

Keypoints are the exact points the shapes are drawn from (COCO-WholeBody-133, shared/DESIGN.md §1):
lips (iBUG 48-67) bound the lips / mouth-interior ellipses, the 21 hand points are the glove's
polylines, the jaw points lie on the head ellipse, etc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from halfbody.data.keypoints import NUM_KEYPOINTS

from .identity import EYE_WHITE, MOUTH_COLOR, PUPIL, Identity

# ------------------------------------------------------------------------------------------ rig layout
UPPER_ARM, FOREARM = 0.19, 0.18  # world units
SLEEVE_RADIUS, FOREARM_RADIUS = 0.036, 0.031
FINGER_RADIUS, THUMB_RADIUS = 0.10, 0.11  # in hand lengths
HAND_TILT = math.radians(40.0)  # rest direction of the hands: 40 deg from vertical towards the midline
LIP_THICKNESS = 0.075  # head-local (fraction of head ry)
SIDES = ("left", "right")  # the person's left / right; "left" appears on the image right
SIDE_SIGN = {"left": 1.0, "right": -1.0}
HAND_OFFSET = {"left": 91, "right": 112}

# hand-local finger layout, in hand lengths: (MCP u, MCP v, direction deg, length)
_FINGERS = ((0.42, 0.13, 14.0, 0.50), (0.43, 0.045, 4.0, 0.58), (0.42, -0.045, -6.0, 0.52),
            (0.38, -0.13, -16.0, 0.42))
_SEGMENTS = (0.45, 0.30, 0.25)


# ------------------------------------------------------------------------------------------ rasteriser
def _ellipse_sdf(X, Y, cx, cy, rx, ry, angle):
    """Approximate signed distance (pixels) to a rotated ellipse: first-order ``(k - 1) / |grad k|``."""
    rx, ry = max(rx, 1e-3), max(ry, 1e-3)
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = X - cx, Y - cy
    qx, qy = c * dx + s * dy, -s * dx + c * dy
    k = np.sqrt((qx / rx) ** 2 + (qy / ry) ** 2)
    g = np.sqrt((qx / rx ** 2) ** 2 + (qy / ry ** 2) ** 2)
    return np.where(g > 1e-9, (k - 1.0) * k / np.maximum(g, 1e-9), -min(rx, ry))


def _segments_sdf(X, Y, seg, radius):
    """Signed distance to the union of thick segments ``seg (S, 2, 2)`` with radii ``radius (S,)``, vectorised."""
    a, ab = seg[:, 0], seg[:, 1] - seg[:, 0]
    l2 = np.maximum((ab ** 2).sum(1), 1e-12)[:, None, None]
    dx, dy = X[None] - a[:, 0, None, None], Y[None] - a[:, 1, None, None]
    abx, aby = ab[:, 0, None, None], ab[:, 1, None, None]
    t = np.clip((dx * abx + dy * aby) / l2, 0.0, 1.0)
    d = np.sqrt((dx - t * abx) ** 2 + (dy - t * aby) ** 2) - radius[:, None, None]
    return d.min(0)


def _box_sdf(X, Y, cx, cy, hx, hy, r, angle):
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = X - cx, Y - cy
    qx = np.abs(c * dx + s * dy) - (hx - r)
    qy = np.abs(-s * dx + c * dy) - (hy - r)
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r


def _cov(sdf):
    return np.clip(0.5 - sdf, 0.0, 1.0)


class Canvas:
    """A float32 RGB image in ``[0, 1]`` with windowed SDF painting (pixel centres at ``i + 0.5``)."""

    def __init__(self, height: int, width: int, color=(0.0, 0.0, 0.0)):
        self.h, self.w = int(height), int(width)
        self.img = np.empty((self.h, self.w, 3), np.float32)
        self.img[...] = color
        self._xs = np.arange(self.w, dtype=np.float32) + 0.5
        self._ys = np.arange(self.h, dtype=np.float32) + 0.5

    def copy(self) -> Canvas:
        out = object.__new__(Canvas)
        out.h, out.w, out._xs, out._ys = self.h, self.w, self._xs, self._ys
        out.img = self.img.copy()
        return out

    def window(self, x0, y0, x1, y1):
        ix0, iy0 = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
        ix1, iy1 = min(self.w, int(math.ceil(x1)) + 1), min(self.h, int(math.ceil(y1)) + 1)
        if ix0 >= ix1 or iy0 >= iy1:
            return None
        return (slice(iy0, iy1), slice(ix0, ix1)), self._xs[None, ix0:ix1], self._ys[iy0:iy1, None]

    def paint(self, sl, cov, color):
        region = self.img[sl]
        region += cov[..., None] * (np.asarray(color, np.float32) - region)

    def ellipse(self, cx, cy, rx, ry, color, angle=0.0, within=None):
        """Fill an ellipse (optionally intersected with another ellipse ``within=(cx, cy, rx, ry, angle)``).

        Coverage is scaled by ``min(1, 2 * min(rx, ry))`` so a sub-pixel-thin ellipse fades out instead
        of leaving a half-covered line: the mouth interior's pixel area stays monotone in its opening.
        """
        r = max(rx, ry) + 1.0
        win = self.window(cx - r, cy - r, cx + r, cy + r)
        if win is None or min(rx, ry) <= 0:
            return
        sl, X, Y = win
        cov = _cov(_ellipse_sdf(X, Y, cx, cy, rx, ry, angle))
        if within is not None:
            cov = np.minimum(cov, _cov(_ellipse_sdf(X, Y, *within)))
        self.paint(sl, cov * min(1.0, 2.0 * min(rx, ry)), color)

    def strokes(self, polylines, radii, color, ellipses=()):
        """Union of thick polylines (``radii`` per polyline) and ellipses ``(cx, cy, rx, ry, angle)``, one paint."""
        pts = np.concatenate([np.asarray(p, np.float64) for p in polylines] + [np.zeros((0, 2))])
        rmax = max(list(radii) + [max(e[2], e[3]) for e in ellipses] + [0.0]) + 1.0
        xs = [pts[:, 0].min(), pts[:, 0].max()] if len(pts) else []
        ys = [pts[:, 1].min(), pts[:, 1].max()] if len(pts) else []
        for e in ellipses:
            m = max(e[2], e[3])
            xs += [e[0] - m, e[0] + m]
            ys += [e[1] - m, e[1] + m]
        win = self.window(min(xs) - rmax, min(ys) - rmax, max(xs) + rmax, max(ys) + rmax)
        if win is None:
            return
        sl, X, Y = win
        seg = [np.stack([p[:-1], p[1:]], 1) for p in map(lambda q: np.asarray(q, np.float32), polylines)]
        rad = [np.full(len(g), r, np.float32) for g, r in zip(seg, radii)]
        sdf = _segments_sdf(X, Y, np.concatenate(seg), np.concatenate(rad)) if seg else None
        for e in ellipses:
            d = _ellipse_sdf(X, Y, *e)
            sdf = d if sdf is None else np.minimum(sdf, d)
        self.paint(sl, _cov(sdf), color)

    def box(self, cx, cy, hx, hy, r, color, angle=0.0):
        m = math.hypot(hx, hy) + 1.0
        win = self.window(cx - m, cy - m, cx + m, cy + m)
        if win is None:
            return
        sl, X, Y = win
        self.paint(sl, _cov(_box_sdf(X, Y, cx, cy, hx, hy, r, angle)), color)

    def to_uint8(self) -> np.ndarray:
        return (np.clip(self.img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------ camera
@dataclass(frozen=True)
class Camera:
    """World square ``[x0, x0 + size] x [y0, y0 + size]`` rendered to ``resolution x resolution`` pixels."""

    x0: float
    y0: float
    size: float
    resolution: int

    def to_norm(self, p):
        p = np.asarray(p, np.float64)
        return (p - np.array([self.x0, self.y0])) / self.size

    def to_px(self, p):
        return self.to_norm(p) * self.resolution

    def length(self, r: float) -> float:
        return r / self.size * self.resolution


# ------------------------------------------------------------------------------------------ rig
@dataclass(frozen=True)
class Layout:
    """Rest geometry of one identity (world units)."""

    rx: float
    ry: float
    head: tuple[float, float]  # head-ellipse centre at rest
    pivot: tuple[float, float]  # neck base: the head rolls about it
    shoulder: dict  # side -> (x, y)
    hip: dict
    wrist_rest: dict
    torso: tuple[float, float, float, float, float]  # cx, cy, hx, hy, corner radius


def layout_of(identity: Identity) -> Layout:
    rx = identity.head_width / 2
    ry = rx * identity.head_aspect
    head_cy = 0.03 + (0.08 + identity.hair_volume) * ry  # top of the hair just inside the frame
    pivot = (0.5, head_cy + ry + 0.045)
    sy = pivot[1] + 0.035
    sw = identity.shoulder_half_width
    shoulder = {s: (0.5 + SIDE_SIGN[s] * sw, sy + 0.03) for s in SIDES}
    hip = {s: (0.5 + SIDE_SIGN[s] * 0.78 * sw, min(0.97, sy + 0.40)) for s in SIDES}
    wrist_rest = {s: (0.5 + SIDE_SIGN[s] * 0.16, min(0.9, sy + 0.3)) for s in SIDES}
    top, bottom = sy, 1.6
    torso = (0.5, (top + bottom) / 2, sw + 0.035, (bottom - top) / 2, 0.085)
    return Layout(rx, ry, (0.5, head_cy), pivot, shoulder, hip, wrist_rest, torso)


def halfbody_camera(rng: np.random.Generator, resolution: int) -> Camera:
    size = rng.uniform(0.97, 1.03)
    return Camera(0.5 - size / 2 + rng.uniform(-0.02, 0.02), rng.uniform(-0.015, 0.02), size, resolution)


def headshot_camera(rng: np.random.Generator, layout: Layout, resolution: int) -> Camera:
    """A tight head crop: the head (with hair) fills most of the frame."""
    size = 2.55 * layout.ry * rng.uniform(0.95, 1.05)
    cx = layout.head[0] + rng.uniform(-0.04, 0.04) * layout.rx
    cy = layout.head[1] + rng.uniform(0.0, 0.12) * layout.ry
    return Camera(cx - size / 2, cy - size / 2, size, resolution)


@dataclass
class FrameState:
    """Everything that changes between frames."""

    opening: float  # mouth opening in [0, 1] (= e(t_frame))
    sway: float  # low-passed envelope in [0, 1]
    sway_sign: float
    blink: float  # 1 = eyes open, 0 = closed
    wrist: dict  # side -> (x, y) world
    flex: dict  # side -> wrist flex (radians) relative to the forearm
    curl: dict  # side -> finger curl in [0, 1]


def neutral_state(layout: Layout) -> FrameState:
    """The reference pose: mouth closed, no sway, eyes open, hands resting in front of the belly."""
    return FrameState(0.0, 0.0, 1.0, 1.0, dict(layout.wrist_rest), {s: 0.0 for s in SIDES},
                      {s: 0.2 for s in SIDES})


def _rot(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _elbow(shoulder, wrist, side):
    """Two-link IK; the elbow bends outward (away from the body's midline) and down."""
    s, w = np.asarray(shoulder), np.asarray(wrist)
    d_vec = w - s
    d = float(np.clip(np.linalg.norm(d_vec), abs(UPPER_ARM - FOREARM) + 1e-3, UPPER_ARM + FOREARM - 1e-3))
    u = d_vec / max(np.linalg.norm(d_vec), 1e-9)
    a = (UPPER_ARM ** 2 - FOREARM ** 2 + d ** 2) / (2 * d)
    h = math.sqrt(max(UPPER_ARM ** 2 - a ** 2, 0.0))
    perp = np.array([-u[1], u[0]])
    if perp[0] * SIDE_SIGN[side] < 0:
        perp = -perp
    return s + a * u + h * perp, s + d * u


def hand_points(wrist, angle, curl, side, length) -> np.ndarray:
    """The 21 COCO-WholeBody hand points (wrist, thumb CMC/MCP/IP/tip, then MCP/PIP/DIP/tip per finger)."""
    mirror = SIDE_SIGN[side]
    axis = np.array([math.cos(angle), math.sin(angle)])
    perp = np.array([-axis[1], axis[0]]) * mirror
    shrink = 1.0 - 0.45 * curl  # curled fingers look shorter (foreshortening)

    def world(u, v):
        return np.asarray(wrist) + length * (u * axis + v * perp)

    pts = [world(0.0, 0.0)]
    # thumb: CMC, MCP, then two segments bending with curl
    cmc, mcp = np.array([0.12, 0.14]), np.array([0.25, 0.26])
    ang = math.radians(55.0 - 25.0 * curl)
    p = mcp.copy()
    chain = [cmc, mcp]
    for seg in (0.17, 0.14):
        p = p + seg * shrink * np.array([math.cos(ang), math.sin(ang)])
        chain.append(p)
        ang -= math.radians(12.0 * curl)
    pts += [world(*q) for q in chain]
    for mu, mv, deg, flen in _FINGERS:
        p = np.array([mu, mv])
        ang = math.radians(deg)
        chain = [p]
        for frac in _SEGMENTS:
            p = p + flen * frac * shrink * np.array([math.cos(ang), math.sin(ang)])
            chain.append(p)
            ang -= math.radians(15.0 * curl) * (1 if mv >= 0 else 0.6)
        pts += [world(*q) for q in chain]
    return np.stack(pts)


@dataclass
class Pose:
    """World-space geometry of one frame (what is drawn and what the keypoints are)."""

    head: np.ndarray  # head centre
    roll: float
    face: np.ndarray  # (68, 2) iBUG
    ears: np.ndarray  # (2, 2): person's left, right
    elbow: dict
    wrist: dict
    hand: dict  # side -> (21, 2)
    hand_angle: dict
    opening_local: float  # inner mouth half-height, head-local units
    blink: float


def _local_to_world(layout: Layout, head, roll, pts_local):
    pts = np.asarray(pts_local, np.float64) * np.array([layout.rx, layout.ry])
    return head + pts @ _rot(roll).T


def face_local(identity: Identity, opening: float, blink: float) -> tuple[np.ndarray, np.ndarray]:
    """68 iBUG points and the two ears in head-local units (x in head rx, y in head ry, y down)."""
    pts = np.zeros((68, 2))
    phi = np.linspace(math.pi + 0.2, -0.2, 17)  # jaw: image-left ear level, around the chin, image-right
    pts[0:17] = np.stack([np.cos(phi), np.sin(phi)], 1)
    es, ew = identity.eye_spacing, identity.eye_size
    eh = 0.75 * ew * blink
    bx = np.linspace(-1.0, 1.0, 5)
    brow = np.stack([bx * ew * 1.15, -0.2 - 0.06 * (1 - bx ** 2)], 1)
    pts[17:22] = brow + [-es, 0.0]  # image-left brow, outer -> inner
    pts[22:27] = brow + [es, 0.0]  # image-right brow, inner -> outer
    pts[27:31] = np.stack([np.zeros(4), np.linspace(-0.02, 0.30, 4)], 1)
    pts[31:36] = np.stack([np.linspace(-0.12, 0.12, 5), [0.36, 0.375, 0.385, 0.375, 0.36]], 1)
    k = 0.943  # y on the ellipse at x = +-ew/3
    for base, cx, order in ((36, -es, (-1, -1 / 3, 1 / 3, 1, 1 / 3, -1 / 3)), (42, es, (-1, -1 / 3, 1 / 3, 1, 1 / 3, -1 / 3))):
        ys = (0.0, -k, -k, 0.0, k, k)
        for j, (ox, oy) in enumerate(zip(order, ys)):
            pts[base + j] = (cx + ox * ew, 0.02 + oy * eh)
    my, mw = identity.mouth_y, identity.mouth_width
    h_in = opening * identity.mouth_max_open
    ow, oh = mw + 0.03, h_in + LIP_THICKNESS
    # 48 left corner, 49-53 upper lip, 54 right corner, 55-59 lower lip (right -> left)
    a_out = np.concatenate([math.pi + np.arange(7) * math.pi / 6, np.arange(1, 6) * math.pi / 6])
    pts[48:60] = np.stack([ow * np.cos(a_out), my + oh * np.sin(a_out)], 1)
    a_in = np.concatenate([math.pi + np.arange(5) * math.pi / 4, np.arange(1, 4) * math.pi / 4])
    pts[60:68] = np.stack([0.9 * mw * np.cos(a_in), my + h_in * np.sin(a_in)], 1)
    ears = np.array([[1.0, 0.08], [-1.0, 0.08]])
    return pts, ears


def pose_of(identity: Identity, layout: Layout, st: FrameState) -> Pose:
    # head sway (driven by the low-passed envelope): roll about the neck base plus a small nod
    roll = st.sway_sign * math.radians(7.0) * st.sway
    pivot = np.asarray(layout.pivot)
    head = pivot + _rot(roll) @ (np.asarray(layout.head) - pivot) + np.array([0.0, 0.03 * layout.ry * st.sway])
    face, ears = face_local(identity, st.opening, st.blink)
    elbow, wrist, hand, hand_angle = {}, {}, {}, {}
    for s in SIDES:
        e, w = _elbow(layout.shoulder[s], st.wrist[s], s)
        # the hand points up and towards the midline (y is down), flexed by a smooth random angle
        ang = -math.pi / 2 - SIDE_SIGN[s] * HAND_TILT + st.flex[s]
        elbow[s], wrist[s], hand_angle[s] = e, w, ang
        hand[s] = hand_points(w, ang, st.curl[s], s, identity.hand_length)
    return Pose(head, roll, _local_to_world(layout, head, roll, face), _local_to_world(layout, head, roll, ears),
                elbow, wrist, hand, hand_angle, st.opening * identity.mouth_max_open, st.blink)


# ------------------------------------------------------------------------------------------ drawing
def static_layer(identity: Identity, layout: Layout, cam: Camera) -> Canvas:
    """Background and torso: they never move within a clip."""
    cv = Canvas(cam.resolution, cam.resolution, identity.background)
    cx, cy, hx, hy, r = layout.torso
    (px, py), L = cam.to_px((cx, cy)), cam.length
    cv.box(px, py, L(hx), L(hy), L(r), identity.shirt)
    return cv


def draw_frame(identity: Identity, layout: Layout, cam: Camera, static: Canvas, pose: Pose) -> np.ndarray:
    """Render one frame (uint8 ``(H, W, 3)``) of ``pose`` on top of the static layer."""
    cv = static.copy()
    L = cam.length
    rx, ry = L(layout.rx), L(layout.ry)
    roll = pose.roll

    def hp(local):  # head-local -> pixels
        return cam.to_px(_local_to_world(layout, pose.head, roll, np.atleast_2d(local)))[0]

    hv = identity.hair_volume
    if identity.long_hair:
        c = hp((0.0, 0.45))
        cv.box(c[0], c[1], hv * rx, 0.8 * ry, 0.35 * rx, identity.hair, angle=roll)
    # neck (rolls with the head about its base) and arms
    base, top = cam.to_px(layout.pivot), hp((0.0, 0.5))
    cv.strokes([np.stack([base, top])], [0.33 * rx], identity.neck)
    for s in SIDES:
        sh, el, wr = cam.to_px(layout.shoulder[s]), cam.to_px(pose.elbow[s]), cam.to_px(pose.wrist[s])
        cv.strokes([np.stack([sh, el]), np.stack([el, wr])], [L(SLEEVE_RADIUS), L(FOREARM_RADIUS)], identity.sleeve)
    # head
    c = hp((0.0, -0.08))
    cv.ellipse(c[0], c[1], hv * rx, hv * ry, identity.hair, angle=roll)
    for ear in cam.to_px(pose.ears):
        cv.ellipse(ear[0], ear[1], 0.17 * rx, 0.24 * ry, identity.skin, angle=roll)
    hc = cam.to_px(pose.head)
    face_ellipse = (hc[0], hc[1], rx, ry, roll)
    cv.ellipse(*face_ellipse[:4], identity.skin, angle=roll)
    c = hp((0.0, -0.98))
    cv.ellipse(c[0], c[1], 1.1 * rx, (identity.bangs_depth + 0.02) * ry, identity.hair, angle=roll, within=face_ellipse)
    f = cam.to_px(pose.face)
    ew, eh = identity.eye_size * rx, 0.75 * identity.eye_size * ry * pose.blink
    for a, b in ((36, 42), (42, 48)):
        ec = f[a:b].mean(0)
        if pose.blink > 0.3:
            sclera = (ec[0], ec[1], ew, eh, roll)
            cv.ellipse(*sclera[:4], EYE_WHITE, angle=roll)
            pr = 0.55 * identity.eye_size * rx
            cv.ellipse(ec[0], ec[1], pr, pr, PUPIL, within=sclera)
        else:
            cv.strokes([np.stack([f[a], f[a + 3]])], [0.035 * ry], identity.brows)
    cv.strokes([f[17:22], f[22:27]], [0.045 * ry] * 2, identity.brows)
    nose = f[30]
    cv.ellipse(nose[0], nose[1], 0.08 * rx, 0.06 * ry, identity.nose, angle=roll)
    mc = (f[48] + f[54]) / 2
    cv.ellipse(mc[0], mc[1], np.linalg.norm(f[54] - f[48]) / 2, (pose.opening_local + LIP_THICKNESS) * ry,
               identity.lips, angle=roll)
    # mouth interior: inner half-height = opening * mouth_max_open (head-local), the fixed dark red
    cv.ellipse(mc[0], mc[1], np.linalg.norm(f[64] - f[60]) / 2, pose.opening_local * ry, MOUTH_COLOR, angle=roll)
    # gloves last: always fully visible, so their pixels are exactly where the hand keypoints are
    for s in SIDES:
        hpx = cam.to_px(pose.hand[s])
        fingers = [hpx[1:5]] + [hpx[5 + 4 * i: 9 + 4 * i] for i in range(4)]
        radii = [L(THUMB_RADIUS * identity.hand_length)] + [L(FINGER_RADIUS * identity.hand_length)] * 4
        a = pose.hand_angle[s]
        palm_c = cam.to_px(pose.wrist[s] + 0.22 * identity.hand_length * np.array([math.cos(a), math.sin(a)]))
        palm = (palm_c[0], palm_c[1], L(0.30 * identity.hand_length), L(0.21 * identity.hand_length), a)
        cv.strokes(fingers, radii, identity.glove_left if s == "left" else identity.glove_right, ellipses=[palm])
    return cv.to_uint8()


def keypoints_of(layout: Layout, cam: Camera, pose: Pose) -> np.ndarray:
    """COCO-WholeBody-133 ``(133, 3)``: normalised x, y and score (1 inside the frame, 0 outside or hidden)."""
    world = np.zeros((NUM_KEYPOINTS, 2))
    hidden = np.zeros(NUM_KEYPOINTS, bool)
    f = pose.face
    world[0] = f[30]  # nose tip
    world[1], world[2] = f[42:48].mean(0), f[36:42].mean(0)  # left eye (image right), right eye
    world[3], world[4] = pose.ears[0], pose.ears[1]
    for s, (sh, el, wr, hip) in {"left": (5, 7, 9, 11), "right": (6, 8, 10, 12)}.items():
        world[sh], world[el], world[wr], world[hip] = layout.shoulder[s], pose.elbow[s], pose.wrist[s], layout.hip[s]
    # knees, ankles and feet: below the torso, never drawn (score 0)
    for s, (kn, an) in {"left": (13, 15), "right": (14, 16)}.items():
        hx = layout.hip[s][0]
        world[kn], world[an] = (hx, layout.hip[s][1] + 0.35), (hx, layout.hip[s][1] + 0.7)
    hidden[13:23] = True
    world[17:20] = world[15] + [[0.03, 0.05], [0.06, 0.05], [0.0, 0.03]]
    world[20:23] = world[16] + [[-0.03, 0.05], [-0.06, 0.05], [0.0, 0.03]]
    if pose.blink <= 0.3:
        hidden[1:3] = True  # closed eyes: the detector would not see the pupils
    world[23:91] = f
    for s in SIDES:
        world[HAND_OFFSET[s]:HAND_OFFSET[s] + 21] = pose.hand[s]
    xy = cam.to_norm(world)
    inside = np.all((xy >= 0.0) & (xy <= 1.0), axis=1) & ~hidden
    out = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    out[:, :2] = np.clip(xy, 0.0, 1.0)
    out[:, 2] = inside
    return out


def head_box(layout: Layout, cam: Camera, poses: list[Pose], identity: Identity) -> list[float]:
    """Normalised union over frames of the head's bounding box (hair included), clipped to the frame."""
    boxes = []
    m = identity.hair_volume + 0.1
    for p in poses:
        c = cam.to_norm(p.head)
        rx, ry = m * layout.rx / cam.size, m * layout.ry / cam.size
        boxes.append((c[0] - rx, c[1] - ry - 0.08 * layout.ry / cam.size, c[0] + rx, c[1] + ry))
    b = np.asarray(boxes)
    return [float(np.clip(v, 0.0, 1.0)) for v in (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())]
