"""Synthetic street scenes in the CityScapes raw layout (``datasets/synthetic.md``).

A pinhole camera 1.22 m above a straight street renders, with a z-buffer, exact labels, instances and disparity:
ground (road, sidewalk, terrain), facades parallel to the street, and fronto-parallel trees, poles, cars and persons
(the last two as instances). The intrinsics are CityScapes' scaled to the width and the baseline is CityScapes', so
``depth = baseline * fx / disparity`` holds as for the real data.
"""

from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np

from mtl_keras.atomic_files import write_json_atomically

__all__ = ["generate_synthetic_cityscapes", "SYNTHETIC_CITIES", "render_scene"]

SYNTHETIC_CITIES = {"train": "synthtown", "val": "synthville"}
_MANIFEST = "synthetic_manifest.json"
_VERSION = 1
_SPLIT_CODE = {"train": 1, "val": 2}

BASELINE = 0.209313
CAM_HEIGHT = 1.22
_FX_2048 = 2262.52
_FRAME = 19  # CityScapes' annotated frame number

# labelIds
SKY, ROAD, SIDEWALK, TERRAIN, BUILDING, VEGETATION, POLE, CAR, PERSON = 23, 7, 8, 22, 11, 21, 17, 26, 24


def camera_parameters(height: int, width: int) -> dict:
    """The camera.json content used for a synthetic scene of the given size."""
    fx = _FX_2048 * width / 2048.0
    return {
        "extrinsic": {"baseline": BASELINE, "pitch": 0.0, "roll": 0.0, "x": 1.7, "y": 0.1,
                      "yaw": 0.0, "z": CAM_HEIGHT},
        "intrinsic": {"fx": fx, "fy": fx, "u0": (width - 1) / 2.0, "v0": 0.42 * height},
    }


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV (h in degrees) -> RGB float in [0, 1]."""
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    m = v - c
    i = int(h) % 6
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][i]
    return np.array(rgb, dtype=np.float32) + m


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], shape (h, w)."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).clip(-2.5, 2.5) / 1.5


class _Canvas:
    """z-buffered label / instance / disparity / colour buffers."""

    def __init__(self, height: int, width: int, rng: np.random.Generator):
        self.h, self.w = height, width
        cam = camera_parameters(height, width)["intrinsic"]
        self.fx, self.fy, self.u0, self.v0 = cam["fx"], cam["fy"], cam["u0"], cam["v0"]
        self.bf = BASELINE * self.fx
        self.label = np.full((height, width), SKY, np.uint8)
        self.inst = np.zeros((height, width), np.int32)  # 0 = no instance
        self.disp = np.zeros((height, width), np.float64)  # 0 = at infinity (sky)
        self.color = np.zeros((height, width, 3), np.float32)
        self.rows = np.arange(height, dtype=np.float64)[:, None]
        self.cols = np.arange(width, dtype=np.float64)[None, :]
        self.fine_noise = rng.standard_normal((height, width)).astype(np.float32)

    def u_of(self, x, z):
        return self.u0 + self.fx * x / z

    def v_of(self, y, z):  # y = height above the ground
        return self.v0 + self.fy * (CAM_HEIGHT - y) / z

    def draw_object(self, x: float, z: float, half_width: float, height: float, shape_fn,
                    label: int, inst: int = 0):
        """Draws a fronto-parallel object at lateral position x, distance z. ``shape_fn(xl, yl)`` gets the metric
        coordinates of the box's pixels (xl from the object's centre, yl above the ground) and returns (mask, rgb)."""
        u_a = int(np.floor(self.u_of(x - half_width, z)))
        u_b = int(np.ceil(self.u_of(x + half_width, z))) + 1
        v_a = int(np.floor(self.v_of(height, z)))
        v_b = int(np.ceil(self.v_of(0.0, z))) + 1
        u_a, u_b = max(u_a, 0), min(u_b, self.w)
        v_a, v_b = max(v_a, 0), min(v_b, self.h)
        if u_a >= u_b or v_a >= v_b:
            return False
        xl = (self.cols[:, u_a:u_b] - self.u0) * z / self.fx - x
        yl = CAM_HEIGHT - (self.rows[v_a:v_b] - self.v0) * z / self.fy
        xl, yl = np.broadcast_arrays(xl, yl)
        mask, rgb = shape_fn(xl, yl)
        d = self.bf / z
        sl = (slice(v_a, v_b), slice(u_a, u_b))
        mask = mask & (d >= self.disp[sl])
        if not mask.any():
            return False
        self.paint(sl, mask, d, label, inst, rgb)
        return True

    def paint(self, sl, mask, disp, label, inst, rgb):
        """Writes the pixels ``mask`` (already z-tested) of the window ``sl``."""
        self.disp[sl][mask] = disp
        self.label[sl][mask] = label
        self.inst[sl][mask] = inst
        self.color[sl][mask] = rgb[mask]


def _render_ground(cv: _Canvas, rng, road_half, x_off, sw_left, sw_right, tint):
    below = cv.rows[:, 0] > cv.v0 + 0.5
    r0 = int(np.argmax(below))
    rows = cv.rows[r0:]
    z = cv.fy * CAM_HEIGHT / (rows - cv.v0)  # (h', 1)
    x = (cv.cols - cv.u0) * z / cv.fx - x_off  # (h', w) lateral position w.r.t. road centre
    z = np.broadcast_to(z, x.shape)
    ax = np.abs(x)
    sw = np.where(x < 0, sw_left, sw_right)
    road = ax < road_half
    sidewalk = ~road & (ax < road_half + sw)
    terrain = ~road & ~sidewalk
    label = np.where(road, ROAD, np.where(sidewalk, SIDEWALK, TERRAIN)).astype(np.uint8)

    n = cv.fine_noise[r0:]
    low = _smooth_noise(rng, cv.h - r0, cv.w, 12)
    col = np.empty(x.shape + (3,), np.float32)
    # road: dark purple-grey asphalt with fine grain and dashed lane markings
    road_rgb = np.array([0.33, 0.30, 0.36], np.float32) * tint
    col[:] = road_rgb * (1 + 0.06 * n + 0.05 * low)[..., None]
    dash = ((z % 6.0) < 3.0) & (np.abs(x) < 0.08)
    edge = (np.abs(ax - (road_half - 0.3)) < 0.07)
    col[road & (dash | edge)] = np.array([0.85, 0.85, 0.82], np.float32)
    # sidewalk: pinkish-beige tiles, curb stone at the road edge
    sw_rgb = np.array([0.62, 0.52, 0.55], np.float32) * tint
    tiles = ((z % 1.2) < 0.08) | (((ax - road_half) % 1.2) < 0.08)
    sw_col = sw_rgb * (1 + 0.05 * n + 0.04 * low)[..., None]
    sw_col = np.where(tiles[..., None], sw_col * 0.8, sw_col)
    curb = ax < road_half + 0.2
    sw_col = np.where(curb[..., None], np.array([0.75, 0.74, 0.72], np.float32), sw_col)
    col = np.where(sidewalk[..., None], sw_col, col)
    # terrain: yellow-green grass
    ter = np.array([0.45, 0.55, 0.25], np.float32) * (1 + 0.12 * n + 0.15 * low)[..., None]
    col = np.where(terrain[..., None], ter, col)

    cv.label[r0:] = label
    cv.disp[r0:] = cv.bf / z
    cv.color[r0:] = col


def _render_facade(cv: _Canvas, side: int, x_facade: float, z_a: float, z_b: float,
                   height: float, base_rgb, window_rgb, win_w, win_h, z_origin):
    """Building facade in the plane x = x_facade (camera frame), from distance z_a to z_b."""
    # columns where the facade plane lies between z_a and z_b
    u_near = cv.u_of(x_facade, z_a)
    u_far = cv.u_of(x_facade, z_b)
    lo, hi = sorted((u_near, u_far))
    c_a, c_b = max(int(np.floor(lo)), 0), min(int(np.ceil(hi)) + 1, cv.w)
    if c_a >= c_b:
        return
    du = cv.cols[:, c_a:c_b] - cv.u0
    with np.errstate(divide="ignore", invalid="ignore"):
        z = cv.fx * x_facade / du  # (1, n)
    ok = (z >= z_a) & (z <= z_b) & (du * side > 0)
    z = np.where(ok, z, z_b)
    v_top = cv.v_of(height, z)
    v_bot = cv.v_of(0.0, z)
    rows = cv.rows
    mask = ok & (rows >= v_top) & (rows <= v_bot)
    d = np.where(ok, cv.bf / z, 0.0)
    sl = (slice(None), slice(c_a, c_b))
    mask &= d >= cv.disp[sl]
    if not mask.any():
        return
    y = CAM_HEIGHT - (rows - cv.v0) * z / cv.fy
    zz = np.broadcast_to(z - z_origin, mask.shape)
    win = (((zz % (win_w * 2.0)) > win_w * 0.5) & ((zz % (win_w * 2.0)) < win_w * 1.5)
           & ((y % (win_h * 2.0)) > win_h * 0.6) & (y > 2.8) & (y < height - 1.0))
    n = cv.fine_noise[sl]
    col = base_rgb * (1 + 0.07 * n)[..., None]
    col = np.where(win[..., None], window_rgb * (1 + 0.03 * n)[..., None], col)
    # ground floor darker
    col = np.where((y < 2.6)[..., None], col * 0.75, col)
    cv.paint(sl, mask, np.broadcast_to(d, mask.shape)[mask], BUILDING, 0, col)


def _facade_colors(rng):
    g = rng.uniform(0.30, 0.62)
    tint = np.array([rng.uniform(0.95, 1.12), 1.0, rng.uniform(0.85, 1.0)], np.float32)
    base = np.clip(g * tint, 0, 1).astype(np.float32)
    window = np.array([0.12, 0.15, 0.22], np.float32) * rng.uniform(0.7, 1.3)
    return base, window


def _tree_shape(trunk_h, crown_r, crown_rgb, trunk_rgb, noise_seed):
    def fn(xl, yl):
        cy = trunk_h + crown_r * 0.8
        crown = (xl / crown_r) ** 2 + ((yl - cy) / (crown_r * 1.1)) ** 2 <= 1.0
        trunk = (np.abs(xl) < 0.15) & (yl < trunk_h + 0.2)
        # leafy texture: deterministic pattern in object coordinates
        leaf = np.sin(xl * 9.1 + noise_seed) * np.sin(yl * 8.3 + 2 * noise_seed)
        rgb = np.where(crown[..., None], crown_rgb * (1 + 0.25 * leaf)[..., None], trunk_rgb)
        return crown | trunk, rgb.astype(np.float32)
    return fn


def _pole_shape(height, half_w, rgb):
    def fn(xl, yl):
        m = (np.abs(xl) <= half_w) & (yl <= height)
        shade = 1.0 - 0.3 * np.abs(xl) / half_w
        return m, (rgb * shade[..., None]).astype(np.float32)
    return fn


def _car_shape(w, h, body_rgb):
    hw = w / 2

    def fn(xl, yl):
        ax = np.abs(xl)
        y_cab = 0.58 * h
        lower = (yl >= 0.22) & (yl < y_cab) & (ax <= hw)
        t = np.clip((yl - y_cab) / (h - y_cab), 0, 1)
        cabin = (yl >= y_cab) & (yl <= h) & (ax <= hw * (0.88 - 0.22 * t))
        wheels = (yl < 0.36) & (ax >= hw - 0.42) & (ax <= hw - 0.06)
        mask = lower | cabin | wheels
        rgb = np.broadcast_to(body_rgb, xl.shape + (3,)).copy()
        glass = cabin & (yl > y_cab + 0.06) & (yl < h - 0.06) & (ax <= hw * (0.80 - 0.22 * t))
        rgb[glass] = (0.10, 0.12, 0.16)
        lights = (yl > 0.40 * h) & (yl < 0.52 * h) & (ax > hw - 0.30) & (ax <= hw - 0.04)
        rgb[lights] = (0.85, 0.10, 0.08)
        plate = (yl > 0.30) & (yl < 0.42) & (ax < 0.26)
        rgb[plate & lower] = (0.9, 0.9, 0.88)
        rgb[wheels & ~lower] = (0.06, 0.06, 0.06)
        rgb[wheels & (yl < 0.22)] = (0.06, 0.06, 0.06)
        return mask, rgb
    return fn


def _person_shape(h, shirt_rgb, pants_rgb, skin_rgb, arms_out):
    def fn(xl, yl):
        ax = np.abs(xl)
        head_r = 0.11 * h / 1.75
        head = xl ** 2 + (yl - (h - head_r)) ** 2 <= head_r ** 2
        neck = (ax < 0.05) & (yl > h - 2 * head_r - 0.06) & (yl <= h - head_r)
        torso = (yl >= 0.47 * h) & (yl < h - 2 * head_r - 0.03) & (ax <= 0.21)
        arms = ((yl >= 0.42 * h) & (yl < h - 2 * head_r - 0.06) & (ax > 0.21)
                & (ax <= 0.21 + 0.08 + arms_out * (h - 2 * head_r - yl)))
        legs = (yl < 0.47 * h) & (ax <= 0.17) & ~((ax < 0.035) & (yl < 0.43 * h))
        mask = head | neck | torso | arms | legs
        rgb = np.broadcast_to(pants_rgb, xl.shape + (3,)).copy()
        rgb[torso | arms] = shirt_rgb
        rgb[head | neck] = skin_rgb
        return mask, rgb
    return fn


def render_scene(rng: np.random.Generator, height: int, width: int):
    """Renders one scene. Returns (rgb uint8 HxWx3, labelIds uint8, instanceIds uint16,
    disparity PNG values uint16)."""
    cv = _Canvas(height, width, rng)

    # ---- street layout --------------------------------------------------------------
    road_half = rng.uniform(3.5, 7.0)
    x_off = rng.uniform(-0.45, 0.45) * road_half  # camera position w.r.t. road centre
    sw = {-1: rng.uniform(1.8, 4.0), 1: rng.uniform(1.8, 4.0)}
    tint = np.float32(rng.uniform(0.85, 1.15))
    haze_dist = rng.uniform(60.0, 160.0)
    sun = rng.uniform(0.8, 1.2)

    _render_ground(cv, rng, road_half, x_off, sw[-1], sw[1], tint)

    # ---- buildings closing the street (fronto-parallel, far) --------------------------
    if rng.random() < 0.6:
        zf = rng.uniform(70.0, 160.0)
        base, window = _facade_colors(rng)
        hb = rng.uniform(8.0, 35.0)
        cv.draw_object(x_off, zf, 200.0, hb,
                       lambda xl, yl: (np.ones(xl.shape, bool),
                                       np.where(((yl % 3.2) > 1.8)[..., None] & (yl > 2.8)[..., None],
                                                window, base).astype(np.float32)),
                       BUILDING)

    # ---- facades along both sides ----------------------------------------------------
    gaps = []  # (side, z_a, z_b) ranges without buildings (trees go there)
    for side in (-1, 1):
        z = rng.uniform(2.0, 12.0)
        x_front = road_half + sw[side]
        while z < 180.0:
            length = rng.uniform(8.0, 35.0)
            if rng.random() < 0.2:
                gaps.append((side, z, z + length))
            else:
                setback = rng.uniform(0.0, 3.0) if rng.random() < 0.5 else 0.0
                xf = x_off + side * (x_front + setback)
                base, window = _facade_colors(rng)
                _render_facade(cv, side, xf, z, z + length, rng.uniform(6.0, 28.0), base, window,
                               rng.uniform(0.8, 1.5), rng.uniform(1.4, 1.8), z)
            z += length

    # ---- objects: trees, poles, cars, persons (drawn far to near with a z-buffer) ---------
    _draw_objects(cv, rng, _place_objects(rng, gaps, road_half, x_off, sw))
    return _finish(cv, rng, sun, haze_dist)


def _place_objects(rng, gaps, road_half, x_off, sw):
    """[(z, kind, x)] of the trees, poles, cars and persons of a scene."""
    objects = []
    for _ in range(rng.integers(0, 7)):
        side = rng.choice([-1, 1])
        if gaps and rng.random() < 0.5:
            g = gaps[rng.integers(len(gaps))]
            side, z = g[0], rng.uniform(g[1], g[2])
            x = x_off + side * (road_half + sw[side] + rng.uniform(1.0, 6.0))
        else:
            z = rng.uniform(5.0, 80.0)
            x = x_off + side * (road_half + sw[side] * rng.uniform(0.55, 0.85))
        objects.append((z, "tree", x))
    for _ in range(rng.integers(0, 5)):
        side = rng.choice([-1, 1])
        objects.append((rng.uniform(4.0, 60.0), "pole", x_off + side * (road_half + 0.45)))
    lanes = [x_off - road_half / 2, x_off + road_half / 2,
             x_off - road_half + 1.1, x_off + road_half - 1.1]
    used = []
    for _ in range(rng.integers(1, 9)):
        for _try in range(10):
            lane = int(rng.integers(len(lanes)))
            z = float(rng.uniform(4.0, 70.0))
            if all(l != lane or abs(z - zz) > 6.0 for l, zz in used):
                used.append((lane, z))
                objects.append((z, "car", lanes[lane] + rng.uniform(-0.3, 0.3)))
                break
    for _ in range(rng.integers(0, 7)):
        side = rng.choice([-1, 1])
        if rng.random() < 0.7:  # on the sidewalk
            x = x_off + side * (road_half + sw[side] * rng.uniform(0.2, 0.9))
        else:  # crossing the road
            x = x_off + rng.uniform(-road_half + 0.3, road_half - 0.3)
        objects.append((rng.uniform(3.5, 45.0), "person", x))

    return objects


def _draw_objects(cv: _Canvas, rng, objects):
    objects.sort(key=lambda o: -o[0])  # far to near
    k_inst = {CAR: 0, PERSON: 0}
    for z, kind, x in objects:
        if kind == "tree":
            trunk_h, crown_r = rng.uniform(1.5, 3.0), rng.uniform(1.2, 3.0)
            crown = _hsv(rng.uniform(75, 125), rng.uniform(0.5, 0.8), rng.uniform(0.35, 0.6))
            trunk = np.array([0.30, 0.22, 0.14], np.float32)
            cv.draw_object(x, z, crown_r, trunk_h + crown_r * 1.9,
                           _tree_shape(trunk_h, crown_r, crown, trunk, rng.uniform(0, 6.28)),
                           VEGETATION)
        elif kind == "pole":
            ph, hw = rng.uniform(4.0, 8.0), rng.uniform(0.07, 0.12)
            g = rng.uniform(0.55, 0.75)
            cv.draw_object(x, z, hw, ph, _pole_shape(ph, hw, np.array([g, g, g * 1.05], np.float32)), POLE)
        elif kind == "car":
            w, h = rng.uniform(1.65, 2.0), rng.uniform(1.35, 1.75)
            body = _hsv(rng.uniform(200, 260), rng.uniform(0.35, 0.95), rng.uniform(0.25, 0.85))
            inst = CAR * 1000 + k_inst[CAR]
            if cv.draw_object(x, z, w / 2, h, _car_shape(w, h, body), CAR, inst):
                k_inst[CAR] += 1
        elif kind == "person":
            h = rng.uniform(1.55, 1.95)
            shirt = _hsv(rng.uniform(-35, 35), rng.uniform(0.55, 0.95), rng.uniform(0.45, 0.9))
            pants = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.5), rng.uniform(0.1, 0.35))
            skin = _hsv(rng.uniform(15, 35), rng.uniform(0.3, 0.6), rng.uniform(0.45, 0.9))
            inst = PERSON * 1000 + k_inst[PERSON]
            if cv.draw_object(x, z, 0.45, h, _person_shape(h, shirt, pants, skin, rng.uniform(0, 0.1)),
                              PERSON, inst):
                k_inst[PERSON] += 1


def _finish(cv: _Canvas, rng, sun, haze_dist):
    """Sky, haze, lighting and sensor noise; the four arrays of :func:`render_scene`."""
    sky = cv.label == SKY
    t = np.clip(cv.rows / max(cv.v0, 1.0), 0, 1).astype(np.float32)  # 0 top .. 1 horizon
    sky_top = _hsv(rng.uniform(200, 220), rng.uniform(0.35, 0.6), rng.uniform(0.7, 0.9))
    horizon = np.array([0.80, 0.84, 0.88], np.float32)
    clouds = np.clip(_smooth_noise(rng, cv.h, cv.w, 24), 0, 1)[..., None]
    sky_rgb = sky_top * (1 - t[..., None]) + horizon * t[..., None]
    sky_rgb = sky_rgb * (1 - 0.5 * clouds) + 0.95 * 0.5 * clouds
    color = np.where(sky[..., None], sky_rgb, cv.color * sun)
    with np.errstate(divide="ignore"):
        depth = np.where(cv.disp > 0, cv.bf / np.maximum(cv.disp, 1e-12), np.inf)
    haze = (1.0 - np.exp(-depth / haze_dist)).astype(np.float32)[..., None]
    color = np.where(sky[..., None], color, color * (1 - haze) + horizon * haze)
    color = color + 0.012 * cv.fine_noise[..., None]
    rgb = np.clip(np.rint(color * 255.0), 0, 255).astype(np.uint8)

    label = cv.label
    inst_ids = np.where(cv.inst > 0, cv.inst, label).astype(np.uint16)
    valid = cv.disp > 0
    disp_png = np.where(valid, np.rint(cv.disp * 256.0) + 1, 0).clip(0, 65535).astype(np.uint16)
    return rgb, label, inst_ids, disp_png


def _paths(root: str, split: str, city: str, seq: int) -> dict:
    stem = f"{city}_{seq:06d}_{_FRAME:06d}"
    d = lambda t: os.path.join(root, t, split, city)  # noqa: E731
    return {
        "image": os.path.join(d("leftImg8bit"), f"{stem}_leftImg8bit.png"),
        "label_ids": os.path.join(d("gtFine"), f"{stem}_gtFine_labelIds.png"),
        "instance_ids": os.path.join(d("gtFine"), f"{stem}_gtFine_instanceIds.png"),
        "disparity": os.path.join(d("disparity"), f"{stem}_disparity.png"),
        "camera": os.path.join(d("camera"), f"{stem}_camera.json"),
    }


def _write_png(path: str, array: np.ndarray):
    ok = cv2.imwrite(path, array, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f"could not write {path}")


def _read_manifest(root):
    """The manifest of a generated set, None if absent or unreadable (the set is then generated again)."""
    try:
        with open(os.path.join(root, _MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    params, files = (manifest.get("params"), manifest.get("files")) if isinstance(manifest, dict) else (None, None)
    counts_ok = isinstance(params, dict) and all(
        isinstance(params.get(k), int) and not isinstance(params.get(k), bool) for k in ("num_train", "num_val"))
    if not counts_ok or not isinstance(files, list) or not all(isinstance(p, str) for p in files):
        return None  # as unreadable: what _is_complete and _grows compare must have the written types
    return manifest


def _is_complete(root, manifest, params):
    return (manifest is not None and manifest.get("params") == params
            and all(os.path.isfile(os.path.join(root, p)) for p in manifest.get("files", [])))


def _grows(old, new):
    """Whether the set ``new`` (manifest params) only adds scenes to ``old``: same renderer, size and seed."""
    counts = ("num_train", "num_val")
    return ({k: v for k, v in old.items() if k not in counts} == {k: v for k, v in new.items() if k not in counts}
            and all(new[k] >= old.get(k, 0) for k in counts))


def generate_synthetic_cityscapes(root, num_train: int = 200, num_val: int = 50,
                                  height: int = 256, width: int = 512, seed: int = 0,
                                  overwrite: bool = False) -> str:
    """Writes ``num_train`` + ``num_val`` scenes in the CityScapes raw layout under ``root``; returns ``root``.

    Scene ``i`` of a split has its own random stream seeded by ``(seed, split, i)``: the same arguments give
    byte-identical files, and a complete smaller set of the same size and seed is grown (its scenes kept). A set with
    other arguments raises ``FileExistsError`` unless ``overwrite``."""
    root = os.fspath(root)
    for name, v in (("num_train", num_train), ("num_val", num_val)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if height < 16 or width < 16:
        raise ValueError(f"height and width must be >= 16, got height={height}, width={width}")
    params = {"version": _VERSION, "num_train": int(num_train), "num_val": int(num_val), "height": int(height),
              "width": int(width), "seed": int(seed), "cities": SYNTHETIC_CITIES}
    manifest_path = os.path.join(root, _MANIFEST)
    keep = {"train": 0, "val": 0}  # scenes of an existing smaller set that are kept (grown, not rewritten)
    manifest = None if overwrite else _read_manifest(root)
    if manifest is not None:
        old = manifest.get("params")
        if _is_complete(root, manifest, params):
            return root
        if old is not None and old != params:
            if _grows(old, params) and _is_complete(root, manifest, old):
                keep = {"train": old["num_train"], "val": old["num_val"]}
            else:
                raise FileExistsError(
                    f"{root} already holds a synthetic set generated with {old}; pass "
                    f"overwrite=True or another root to generate one with {params}")

    if os.path.isfile(manifest_path):
        os.remove(manifest_path)
    files = []
    cam = camera_parameters(height, width)
    cam_text = json.dumps(cam, indent=4, sort_keys=True) + "\n"
    for split, count in (("train", num_train), ("val", num_val)):
        city = SYNTHETIC_CITIES[split]
        for t in ("leftImg8bit", "gtFine", "disparity", "camera"):
            d = os.path.join(root, t, split, city)
            if os.path.isdir(d) and not keep[split]:  # only our own synthetic city folders are ever removed
                shutil.rmtree(d)
            os.makedirs(d, exist_ok=True)
        for i in range(int(count)):
            p = _paths(root, split, city, i)
            if i < keep[split]:
                files.extend(os.path.relpath(v, root) for v in p.values())
                continue
            rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], i])
            rgb, label, inst, disp = render_scene(rng, height, width)
            _write_png(p["image"], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            _write_png(p["label_ids"], label)
            _write_png(p["instance_ids"], inst)
            _write_png(p["disparity"], disp)
            with open(p["camera"], "w") as f:
                f.write(cam_text)
            files.extend(os.path.relpath(v, root) for v in p.values())
    write_json_atomically(manifest_path, {"params": params, "files": files}, indent=1)
    return root


DEFAULT_DIR = os.path.join("data", "synthetic")


def generate_for_config(config):
    """The folder of a run's synthetic set (``config.data_dir``, default ``data/synthetic``), generated once."""
    data_dir = config.data_dir or DEFAULT_DIR
    if config.data_dir and os.path.isfile(os.path.join(data_dir, _MANIFEST)):
        return data_dir  # a set generated earlier (any size): use it as it is
    # The data seed is fixed: every run, whatever its training seed, sees the same synthetic set.
    return generate_synthetic_cityscapes(data_dir, num_train=config.synthetic_num_train,
                                         num_val=config.synthetic_num_val, seed=0)

