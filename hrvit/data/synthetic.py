"""Synthetic data, deterministic by seed, for tests, the quickstart and benchmarks.

Slides look like H&E at about 20x (0.5 um/px), with three classes (SLIDE_CLASSES):

- 0 background: glass (near-white, almost flat) and normal stroma (pink, horizontal fibres,
  sparse small nuclei). Large irregular tissue blobs sit on the glass.
- 1 tumour: medium blobs inside the tissue, purple and crowded with dark nuclei.
- 2 gland: small rings (radius size/100..size/40, ~1-3 % of pixels): pale-blue lumen inside a
  dark blue-violet rim; the whole ring, lumen included, is class 2.

Every class differs in colour and texture at the 16-px scale and boundaries are smooth, with zero
label noise, so a tiny ViT can learn it. The generator is analytic: shapes (centres, radii, wobble)
come from the seed, texture is value noise on a hashed integer lattice, so any tile of any pyramid
level is computed on its own and a 64K^2 slide never sits in memory. Texture octaves finer than a
level's pixel fade to their mean, so level l looks like level 0 area-downsampled by 2^l.

The "context" family (FAMILY_CLASSES["context"]) needs the whole slide to be labelled: tissue covers
the slide, a thin dark capsule (a wobbly ring of radius 0.25-0.32 of the short side) crosses it, and
lesions of one purple texture lie on both sides of it; a lesion is 1 tumour inside the capsule and
2 benign outside. Lesions come in twins, one inside and one outside, with the same shape and texture
(keyed by lesion-local coordinates), placed a multiple of CONTEXT_PERIOD apart in a stroma whose texture
repeats every CONTEXT_PERIOD pixels: a window that holds a twin and no capsule has the same pixels as
the window at the other twin, with the other label, so no single window can decide the labels.

Volumes follow BraTS-2021: four MRI channels (t1, t1ce, t2, flair) of a skull-stripped head with a
tumour of nested regions, labels {0, 2 edema, 1 core, 4 enhancing} (whole tumour {1,2,4} ⊃ core
{1,4} ⊃ enhancing {4}), each channel with its own contrasts, noise and smooth bias field.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from hrvit.data.sources import write_nifti
from hrvit.data.tiff import write_pyramid
from hrvit.errors import ConfigError

SLIDE_CLASSES = ("background", "tumour", "gland")
"""Label value i of a synthetic slide mask is SLIDE_CLASSES[i] (the "easy" family)."""

FAMILY_CLASSES = {"easy": SLIDE_CLASSES, "context": ("background", "tumour", "benign")}
"""Class names of each synthetic slide family, label value i = name i."""

CONTEXT_PERIOD = 128
"""The context family's stroma repeats every CONTEXT_PERIOD level-0 pixels and twin lesions sit a multiple of it
apart (a power of two, so twins also line up on every pyramid level up to log2 of it)."""

BRATS_CHANNELS = ("t1", "t1ce", "t2", "flair")

# H&E-like colours, RGB 0..255
GLASS = (242, 241, 246)
STROMA, STROMA_FIBRE, STROMA_NUCLEUS = (238, 170, 205), (-35, -60, -30), (125, 60, 150)
TUMOUR, TUMOUR_NUCLEUS = (180, 120, 195), (70, 30, 115)
RIM, LUMEN = (60, 55, 140), (205, 222, 250)
CAPSULE = (150, 45, 105)  # dense collagen: a deep pink-violet band, darker than stroma, redder than lesions


# --- value noise on a hashed lattice -------------------------------------------------------------

_MIX = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)


def _hash(key: int, *idx: np.ndarray) -> np.ndarray:
    """Uniform [-1, 1) float32 per integer lattice point (broadcast idx), a pure function of key."""
    with np.errstate(over="ignore"):
        h = np.uint64((key * _MIX[0]) % 2**64)
        for i, m in zip(idx, _MIX[1:] * 2):
            h = h ^ (np.asarray(i).astype(np.uint64) * np.uint64(m))
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-23) - 1


def _interp(t: np.ndarray) -> tuple[np.ndarray, int]:
    """Smoothstep interpolation weights from lattice points to coordinates t: [len(t), k] and first index."""
    i = np.floor(t).astype(np.int64)
    f = (t - i).astype(np.float32)
    w = f * f * (3 - 2 * f)
    i0 = int(i.min())
    m = np.zeros((len(t), int(i.max()) - i0 + 2), np.float32)
    rows = np.arange(len(t))
    m[rows, i - i0] = 1 - w
    m[rows, i - i0 + 1] = w
    return m, i0


def noise2(ys: np.ndarray, xs: np.ndarray, ly: float, lx: float, key: int, period: int | None = None) -> np.ndarray:
    """Value noise [len(ys), len(xs)] in about [-1, 1], wavelength (ly, lx) pixels, on a grid of
    increasing coordinates; separable interpolation (gathers, not BLAS, so it threads well). With `period` (ly and lx
    must divide it) the lattice wraps every `period` pixels, so the texture repeats exactly with that period; with
    power-of-two wavelengths a shift by the period changes no bit of the result."""

    def weights(t):
        i = np.floor(t).astype(np.int64)
        f = (t - i).astype(np.float32)
        return i, f * f * (3 - 2 * f)

    (iy, fy), (ix, fx) = weights(ys / ly), weights(xs / lx)
    y0, x0 = int(iy[0]), int(ix[0])
    rows, cols = np.arange(y0, iy[-1] + 2), np.arange(x0, ix[-1] + 2)
    if period is not None:
        rows, cols = rows % (period // ly), cols % (period // lx)
    g = _hash(key, rows[:, None], cols[None, :])
    iy, ix = iy - y0, ix - x0
    a = g[iy] * (1 - fy)[:, None] + g[iy + 1] * fy[:, None]
    return a[:, ix] * (1 - fx) + a[:, ix + 1] * fx


def noise3(zs, ys, xs, lam: float, key: int) -> np.ndarray:
    """3-D value noise [len(zs), len(ys), len(xs)]."""
    (wz, iz), (wy, iy), (wx, ix) = (_interp(c / lam) for c in (zs, ys, xs))
    g = _hash(
        key,
        np.arange(iz, iz + wz.shape[1])[:, None, None],
        np.arange(iy, iy + wy.shape[1])[None, :, None],
        np.arange(ix, ix + wx.shape[1])[None, None, :],
    )
    return np.einsum("ai,bj,ck,ijk->abc", wz, wy, wx, g, optimize=True)


def _smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0, 1)
    return t * t * (3 - 2 * t)


@cache
def _coverage(a: float, b: float) -> float:
    """Mean of smoothstep(a, b, noise): what a nuclei mask averages to once finer than a pixel."""
    c = np.arange(1024, dtype=np.float64)
    return float(_smoothstep(a, b, noise2(c, c, 7.3, 7.3, 12345)).mean())


# --- slides --------------------------------------------------------------------------------------


def _check_family(family: str) -> str:
    if family not in FAMILY_CLASSES:
        raise ConfigError(f"family: unknown synthetic slide family {family!r}; expected one of "
                          f"{', '.join(FAMILY_CLASSES)}")
    return family


class SyntheticSlide:
    """One procedural slide: image(level, y0, x0, h, w) -> uint8 [h, w, 3], label(...) -> uint8 [h, w].
    family: "easy" (labels from local texture) or "context" (labels from the slide-wide capsule)."""

    def __init__(self, size: int | tuple[int, int], seed: int = 0, family: str = "easy"):
        self.shape = (int(size),) * 2 if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.family = _check_family(family)
        self.classes = FAMILY_CLASSES[family]
        rng = np.random.default_rng(self.seed)
        H, W = self.shape
        s = float(np.sqrt(H * W))
        self.scale = s
        if family == "context":
            self._init_context(rng)
            return
        self.key = int(rng.integers(2**31))
        self.stain = rng.uniform(-10, 10, 3).astype(np.float32)  # per-slide colour cast

        n = max(1, round(rng.integers(2, 5) * max(H, W) / min(H, W)))
        self.tissue = np.stack(
            [rng.uniform(0.2, 0.8, n) * H, rng.uniform(0.2, 0.8, n) * W, rng.uniform(0.18, 0.3, n) * s], 1
        )
        self.tissue_amp, self.tissue_lam = 0.3 * float(self.tissue[:, 2].mean()), 0.6 * float(self.tissue[:, 2].mean())

        # a coarse map of the tissue field places tumours and glands inside tissue
        step = max(H, W) / 256
        gy, gx = ((np.arange(int(np.ceil(d / step))) + 0.5) * step for d in (H, W))
        coarse = self._tissue_sd(gy, gx, 0.0)

        def inside(y, x, margin):
            return coarse[min(int(y / step), len(gy) - 1), min(int(x / step), len(gx) - 1)] > margin

        tumours, want = [], rng.integers(2, 6)
        for _ in range(500):
            if len(tumours) == want:
                break
            r = rng.uniform(0.07, 0.14) * s
            y, x = rng.uniform(0, H), rng.uniform(0, W)
            if inside(y, x, 0.5 * r):
                tumours.append((y, x, r))
        self.tumours = np.array(tumours, np.float64).reshape(-1, 3)
        mean_r = float(self.tumours[:, 2].mean()) if tumours else 1.0
        self.tumour_amp, self.tumour_lam = 0.35 * mean_r, 0.8 * mean_r

        target, area, glands = rng.uniform(0.012, 0.025) * H * W, 0.0, []
        for _ in range(5000):
            if area >= target:
                break
            r = rng.uniform(s / 100, s / 40)
            y, x = rng.uniform(0, H), rng.uniform(0, W)
            if not inside(y, x, 1.4 * r + 2) or any(np.hypot(y - g[0], x - g[1]) < 1.4 * (r + g[2]) for g in glands):
                continue
            a2, a3 = rng.uniform(0, 0.15), rng.uniform(0, 0.08)
            p2, p3, rim = rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.45)
            glands.append((y, x, r, a2, p2, a3, p3, rim))
            area += np.pi * r * r
        self.glands = np.array(glands, np.float64).reshape(-1, 8)

    # geometry: signed fields in level-0 pixels, positive inside ------------------------------------

    def _blobs_sd(self, blobs, amp, lam, key, ys, xs, margin) -> np.ndarray | None:
        """max over blobs of (radius - distance), wobbled by noise; None if no blob reaches this window."""
        sd = None
        for cy, cx, r in blobs.tolist():
            dy = max(ys[0] - cy, cy - ys[-1], 0)
            dx = max(xs[0] - cx, cx - xs[-1], 0)
            if np.hypot(dy, dx) > r + amp + margin:
                continue
            d = r - np.sqrt(((ys - cy) ** 2)[:, None] + ((xs - cx) ** 2)[None, :]).astype(np.float32)
            sd = d if sd is None else np.maximum(sd, d)
        if sd is not None:
            sd += amp * (0.7 * noise2(ys, xs, lam, lam, key) + 0.3 * noise2(ys, xs, lam / 3, lam / 3, key + 1))
        return sd

    def _tissue_sd(self, ys, xs, margin):
        return self._blobs_sd(self.tissue, self.tissue_amp, self.tissue_lam, self.key + 1, ys, xs, margin)

    def _tumour_sd(self, ys, xs, margin):
        return self._blobs_sd(self.tumours, self.tumour_amp, self.tumour_lam, self.key + 3, ys, xs, margin)

    def _glands(self, ys, xs, margin):
        """(window slices, gland sd, lumen sd) for each gland reaching this window."""
        out = []
        for cy, cx, r, a2, p2, a3, p3, rim in self.glands.tolist():
            reach = r * (1 + a2 + a3) + margin
            y0, y1 = np.searchsorted(ys, cy - reach), np.searchsorted(ys, cy + reach)
            x0, x1 = np.searchsorted(xs, cx - reach), np.searchsorted(xs, cx + reach)
            if y1 <= y0 or x1 <= x0:
                continue
            dy = (ys[y0:y1] - cy)[:, None].astype(np.float32)
            dx = (xs[x0:x1] - cx)[None, :].astype(np.float32)
            d = np.sqrt(dy * dy + dx * dx)
            theta = np.arctan2(dy, dx)
            radius = r * (1 + a2 * np.cos(2 * theta + p2) + a3 * np.cos(3 * theta + p3))
            out.append(((slice(y0, y1), slice(x0, x1)), radius - d, radius * (1 - rim) - d))
        return out

    @staticmethod
    def _coords(level, y0, x0, h, w):
        """Level-0 coordinates of the centres of a level's pixels (float64, exact for any slide size)."""
        ds = 2.0**level
        return (np.arange(y0, y0 + h) + 0.5) * ds - 0.5, (np.arange(x0, x0 + w) + 0.5) * ds - 0.5, ds

    def label(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """uint8 [h, w] classes at the level's pixel centres (nearest sampling, no blending)."""
        if self.family == "context":
            return self._context_label(level, y0, x0, h, w)
        ys, xs, _ = self._coords(level, y0, x0, h, w)
        out = np.zeros((h, w), np.uint8)
        tissue = self._tissue_sd(ys, xs, 0.0)
        if tissue is None:
            return out
        tumour = self._tumour_sd(ys, xs, 0.0)
        if tumour is not None:
            out[(tumour > 0) & (tissue > 0)] = 1
        for win, gland, _ in self._glands(ys, xs, 0.0):
            out[win][gland > 0] = 2
        return out

    def image(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """uint8 [h, w, 3] RGB; texture finer than the level's pixel is replaced by its mean."""
        if self.family == "context":
            return self._context_image(level, y0, x0, h, w)
        ys, xs, ds = self._coords(level, y0, x0, h, w)
        k = self.key

        def fade(lam):  # how much of an octave of wavelength lam survives at this level
            return float(np.clip(lam / ds - 1, 0, 1))

        def nz(lam_y, lam_x, key):
            f = fade(min(lam_y, lam_x))
            return noise2(ys, xs, lam_y, lam_x, key) * f if f > 0 else np.zeros((h, w), np.float32)

        def mask(a, b, lam, key):  # nuclei-like mask, fading to its coverage
            f, rho = fade(lam), _coverage(a, b)
            if f == 0:
                return np.full((h, w), rho, np.float32)
            return f * _smoothstep(a, b, noise2(ys, xs, lam, lam, key)) + (1 - f) * rho

        def blend(c, colour, alpha):  # colour: RGB triple or [h, w, 3]
            return c + (np.asarray(colour, np.float32) - c) * alpha[..., None]

        aa = 0.5 * ds + 0.5  # half-width of the anti-aliased edge, level-0 pixels

        def edge(sd):
            return _smoothstep(-aa, aa, sd)

        c = np.broadcast_to(np.array(GLASS, np.float32), (h, w, 3)) + 2.5 * nz(20, 20, k + 10)[..., None]
        tissue = self._tissue_sd(ys, xs, aa)
        if tissue is not None:
            t_alpha = edge(tissue)
            fibre = nz(3, 14, k + 11) + 0.5 * nz(8, 8, k + 12)
            stroma = np.array(STROMA, np.float32) + fibre[..., None] * np.array(STROMA_FIBRE, np.float32)
            stroma = blend(stroma, STROMA_NUCLEUS, 0.85 * mask(0.5, 0.65, 5, k + 13))
            c = blend(c, stroma, t_alpha)
            tumour = self._tumour_sd(ys, xs, aa)
            if tumour is not None:
                u_alpha = edge(tumour) * t_alpha
                if u_alpha.max() > 0:
                    cells = np.array(TUMOUR, np.float32) + 20 * nz(3, 3, k + 14)[..., None]
                    cells = blend(cells, TUMOUR_NUCLEUS, 0.9 * mask(-0.05, 0.15, 6, k + 15))
                    c = blend(c, cells, u_alpha)
            glands = self._glands(ys, xs, aa)
            if glands:
                rim = np.array(RIM, np.float32) + 15 * nz(2, 2, k + 16)[..., None]
                lumen = np.array(LUMEN, np.float32) + 4 * nz(12, 12, k + 17)[..., None]
                for win, gland, hole in glands:
                    c[win] = blend(blend(c[win], rim[win], edge(gland)), lumen[win], edge(hole))
        # stain: smooth variation of intensity across the slide, plus a per-slide cast on tissue
        stain = 1 + 0.08 * noise2(ys, xs, self.scale / 3, self.scale / 3, k + 18)
        c = 255 - (255 - c) * stain[..., None]
        if tissue is not None:
            c = c + self.stain * t_alpha[..., None]
        return np.clip(c + 0.5, 0, 255).astype(np.uint8)

    # the context family --------------------------------------------------------------------------

    def _init_context(self, rng: np.random.Generator) -> None:
        """Capsule (centre, radius, meander, half thickness) and twin lesions (y, x, radius, key, class): each
        lesion inside the capsule gets a twin outside it, a multiple of CONTEXT_PERIOD away, clear of the capsule,
        of the slide's edge and of every other lesion. Centres are whole pixels, so twins' local coordinates are
        equal bit for bit. The capsule meanders (by 0.18 R at a wavelength of 0.5 R), so the piece of it a window
        sees is bent either way, not always round the inside as a circle's would be."""
        H, W = self.shape
        s, m, P = self.scale, min(self.shape), CONTEXT_PERIOD
        self.key = int(rng.integers(2**31))
        self.stain = rng.uniform(-10, 10, 3).astype(np.float32)
        cy, cx = H / 2 + rng.uniform(-0.1, 0.1) * m, W / 2 + rng.uniform(-0.1, 0.1) * m
        R = rng.uniform(0.25, 0.32) * m
        self.capsule = (cy, cx, R)
        self.capsule_amp, self.capsule_lam = 0.18 * R, 0.5 * R
        self.capsule_half = max(2.0, 0.008 * m)
        gap = 0.03 * m  # clearance between a lesion's reach and the capsule, the slide edge or another lesion

        lesions = []  # (y, x, r, key, class)

        def clear(y, x, reach, side):
            """No other lesion within reach + gap, and the capsule's centre line (checked on a grid finer than the
            capsule's thickness) nowhere within reach + gap + half thickness, the lesion on `side` (+1 in)."""
            if any(np.hypot(y - o[0], x - o[1]) < reach + 1.2 * o[2] + gap for o in lesions):
                return False
            e, step = reach + gap + self.capsule_half, max(2.0, self.capsule_half / 2)
            ys, xs = np.arange(y - e, y + e + step, step), np.arange(x - e, x + e + step, step)
            line = self._capsule_line(ys, xs)
            near = np.hypot(*np.meshgrid(ys - y, xs - x, indexing="ij")) <= e
            return bool((side * line[near] > 0).all())

        want = int(rng.integers(2, 5))
        for _ in range(300):
            if len(lesions) == 2 * want:
                break
            r = rng.uniform(0.04, 0.06) * s
            reach = 1.2 * r  # radius + wobble amplitude (0.2 r)
            rho, phi = (R - reach) * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            y, x = float(round(cy + rho * np.sin(phi))), float(round(cx + rho * np.cos(phi)))
            if not clear(y, x, reach, +1):
                continue
            edge = reach + gap
            twins = [(y + P * ky, x + P * kx)
                     for ky in range(-int(y // P), int((H - y) // P) + 1)
                     for kx in range(-int(x // P), int((W - x) // P) + 1)]
            twins = [(ty, tx) for ty, tx in twins if edge <= ty <= H - edge and edge <= tx <= W - edge
                     and np.hypot(ty - cy, tx - cx) > R and clear(ty, tx, reach, -1)]
            if not twins:
                continue
            ty, tx = twins[int(rng.integers(len(twins)))]
            key = int(rng.integers(2**31))
            lesions += [(y, x, r, key, 1), (ty, tx, r, key, 2)]
        self.lesions = lesions

    def _capsule_line(self, ys, xs):
        """Signed distance in pixels to the capsule's centre line, positive inside: the field R - r + meander
        divided by the length of its gradient (central differences, 1 px), so the capsule keeps one thickness
        where the meander flattens the field (its gradient falls to ~0.2 there)."""
        cy, cx, R = self.capsule

        def field(ys, xs):
            d = np.sqrt(((ys - cy) ** 2)[:, None] + ((xs - cx) ** 2)[None, :]).astype(np.float32)
            return R - d + self.capsule_amp * noise2(ys, xs, self.capsule_lam, self.capsule_lam, self.key + 1)

        gy = field(ys + 1, xs) - field(ys - 1, xs)
        gx = field(ys, xs + 1) - field(ys, xs - 1)
        return field(ys, xs) / np.maximum(0.5 * np.sqrt(gy * gy + gx * gx), 0.1)

    def _lesions(self, ys, xs, margin):
        """(window slices, lesion sd, local ys, local xs, key, class) for each lesion reaching this window; the
        wobble and so the shape are functions of lesion-local coordinates and the lesion's key only."""
        out = []
        for cy, cx, r, key, cls in self.lesions:
            reach = 1.2 * r + margin
            y0, y1 = np.searchsorted(ys, cy - reach), np.searchsorted(ys, cy + reach)
            x0, x1 = np.searchsorted(xs, cx - reach), np.searchsorted(xs, cx + reach)
            if y1 <= y0 or x1 <= x0:
                continue
            ly, lx = ys[y0:y1] - cy, xs[x0:x1] - cx
            d = np.sqrt((ly**2)[:, None] + (lx**2)[None, :]).astype(np.float32)
            lam = 0.8 * r
            wobble = 0.7 * noise2(ly, lx, lam, lam, key) + 0.3 * noise2(ly, lx, lam / 3, lam / 3, key + 1)
            out.append(((slice(y0, y1), slice(x0, x1)), r - d + 0.2 * r * wobble, ly, lx, key, cls))
        return out

    def _capsule_sd(self, ys, xs, margin):
        """Half thickness minus the distance to the capsule's centre line (positive on the capsule), or None when
        the capsule does not reach this window."""
        cy, cx, R = self.capsule
        dy = max(ys[0] - cy, cy - ys[-1], 0)
        dx = max(xs[0] - cx, cx - xs[-1], 0)
        far = np.hypot(max(abs(ys[0] - cy), abs(ys[-1] - cy)), max(abs(xs[0] - cx), abs(xs[-1] - cx)))
        # |noise| <= 1 and the field's gradient is at most 1 + amp * 3 sqrt(2) / lam < 3, so where the capsule is
        # drawn, |R - r| <= amp + 3 (half + margin)
        band = self.capsule_amp + 3 * (self.capsule_half + margin)
        if np.hypot(dy, dx) > R + band or far < R - band:
            return None
        return self.capsule_half - np.abs(self._capsule_line(ys, xs))

    def _context_label(self, level, y0, x0, h, w):
        ys, xs, _ = self._coords(level, y0, x0, h, w)
        out = np.zeros((h, w), np.uint8)
        for win, sd, *_, cls in self._lesions(ys, xs, 0.0):
            out[win][sd > 0] = cls
        return out

    def _context_image(self, level, y0, x0, h, w):
        ys, xs, ds = self._coords(level, y0, x0, h, w)
        k, P = self.key, CONTEXT_PERIOD

        def fade(lam):
            return float(np.clip(lam / ds - 1, 0, 1))

        def nz(lam_y, lam_x, key, ys=ys, xs=xs, periodic=True):
            f = fade(min(lam_y, lam_x))
            if f == 0:
                return np.zeros((len(ys), len(xs)), np.float32)
            n = noise2(ys, xs, lam_y, lam_x, key, P if periodic else None)
            return f * n

        def mask(a, b, lam, key, ys=ys, xs=xs, periodic=True):
            f, rho = fade(lam), _coverage(a, b)
            if f == 0:
                return np.full((len(ys), len(xs)), rho, np.float32)
            n = noise2(ys, xs, lam, lam, key, P if periodic else None)
            return f * _smoothstep(a, b, n) + (1 - f) * rho

        def blend(c, colour, alpha):
            return c + (np.asarray(colour, np.float32) - c) * alpha[..., None]

        aa = 0.5 * ds + 0.5

        # stroma everywhere: horizontal fibres and sparse nuclei, repeating every P pixels
        fibre = 0.6 * nz(4, 16, k + 11) + 0.25 * nz(8, 8, k + 12)
        c = np.array(STROMA, np.float32) + fibre[..., None] * np.array(STROMA_FIBRE, np.float32)
        c = blend(c, STROMA_NUCLEUS, 0.6 * mask(0.5, 0.65, 4, k + 13))
        capsule = self._capsule_sd(ys, xs, aa)
        if capsule is not None:
            band = np.array(CAPSULE, np.float32) + 12 * nz(4, 32, k + 14, periodic=False)[..., None]
            c = blend(c, band, _smoothstep(-aa, aa, capsule))
        for win, sd, ly, lx, key, _ in self._lesions(ys, xs, aa):
            cells = np.array(TUMOUR, np.float32) + 20 * nz(3, 3, key + 2, ly, lx, False)[..., None]
            cells = blend(cells, TUMOUR_NUCLEUS, 0.9 * mask(-0.05, 0.15, 6, key + 3, ly, lx, False))
            c[win] = blend(c[win], cells, _smoothstep(-aa, aa, sd))
        return np.clip(c + self.stain + 0.5, 0, 255).astype(np.uint8)


def slide_seed(seed: int, index: int) -> int:
    """Seed of slide `index` in a set generated with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_slides(
    out: Path,
    n: int,
    size: int | tuple[int, int],
    seed: int = 0,
    tile: int = 256,
    val_fraction: float = 0.25,
    progress: Callable[[int, int], None] | None = None,
    family: str = "easy",
) -> Path:
    """Write out/slide_XXX.tiff (RGB pyramid), out/slide_XXX_mask.tiff (label pyramid) and
    out/manifest.csv (image,label,split); returns the manifest path. The folder is also a valid
    "paip" layout. progress(done, n) is called after each slide. family: "easy" or "context"
    (class names in FAMILY_CLASSES)."""
    from hrvit.data.datasets import assign_splits

    _check_family(family)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = [f"slide_{i:03d}" for i in range(n)]
    splits = assign_splits(ids, val_fraction, seed)
    for i, case in enumerate(ids):
        slide = SyntheticSlide(size, slide_seed(seed, i), family=family)
        write_pyramid(out / f"{case}.tiff", slide.shape, slide.image, channels=3, tile=tile, mpp=0.5)
        write_pyramid(out / f"{case}_mask.tiff", slide.shape, slide.label, channels=1, tile=tile, mpp=0.5)
        if progress:
            progress(i + 1, n)
    return _write_manifest(out, ["image", "label", "split"], [[f"{c}.tiff", f"{c}_mask.tiff", splits[c]] for c in ids])


# --- volumes -------------------------------------------------------------------------------------

# mean intensity per channel for grey matter, white matter, edema, core (necrosis), enhancing
_CONTRAST = {
    "t1": (0.55, 0.75, 0.45, 0.30, 0.50),
    "t1ce": (0.55, 0.70, 0.45, 0.25, 1.00),
    "t2": (0.70, 0.50, 0.95, 0.80, 0.65),
    "flair": (0.60, 0.50, 1.00, 0.70, 0.80),
}


def synthetic_volume(shape=(64, 64, 64), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [4, z, y, x] in t1, t1ce, t2, flair order, uint8 seg [z, y, x] in BraTS labels)."""
    rng = np.random.default_rng(seed)
    key = int(rng.integers(2**31))
    zs, ys, xs = (np.arange(d, dtype=np.float64) for d in shape)
    centre = np.array(shape) / 2
    half = np.array(shape) * rng.uniform(0.38, 0.45, 3)
    m = min(shape)

    def field(c, radii, lam, amp, k):
        """radius-normalised signed field in voxels (positive inside an ellipsoid), wobbled."""
        d = np.sqrt(sum(((g - c_) / r_) ** 2 for g, c_, r_ in zip(np.meshgrid(zs, ys, xs, indexing="ij"), c, radii)))
        return (1 - d) * min(radii) + amp * noise3(zs, ys, xs, lam, k)

    brain = field(centre, half, m / 3, 0.06 * m, key)
    inside = brain > 0
    matter = _smoothstep(-0.2, 0.2, noise3(zs, ys, xs, m / 6, key + 1))  # 0 grey .. 1 white

    r_wt = rng.uniform(0.22, 0.3) * m
    gap = max(1.25, 0.03 * m)  # voxels between nested regions, so nesting holds voxel by voxel
    c = centre + rng.uniform(-1, 1, 3) * np.maximum(half - 1.3 * r_wt, 0) * 0.6
    wt = np.minimum(field(c, (r_wt,) * 3, r_wt, 0.25 * r_wt, key + 2), brain - gap)
    c_tc = c + rng.uniform(-0.15, 0.15, 3) * r_wt
    tc = np.minimum(field(c_tc, (0.65 * r_wt,) * 3, 0.6 * r_wt, 0.15 * r_wt, key + 3), wt - gap)
    et = np.minimum(field(c_tc, (0.45 * r_wt,) * 3, 0.5 * r_wt, 0.1 * r_wt, key + 4), tc - gap)
    seg = np.zeros(shape, np.uint8)
    seg[wt > 0] = 2
    seg[tc > 0] = 1
    seg[et > 0] = 4

    out = np.zeros((4, *shape), np.float32)
    for i, name in enumerate(BRATS_CHANNELS):
        gm, wm, ed, core, enh = _CONTRAST[name]
        v = gm + (wm - gm) * matter
        v = v + (ed - v) * _smoothstep(-1, 1, wt)
        v = v + (core - v) * _smoothstep(-1, 1, tc)
        v = v + (enh - v) * _smoothstep(-1, 1, et)
        bias = np.exp(0.15 * noise3(zs, ys, xs, m / 1.5, key + 10 + i))
        v = v * bias + rng.normal(0, 0.03, shape)
        out[i] = np.where(inside, np.clip(v, 0.01, None), 0)
    return out, seg


def make_volumes(out: Path, n: int, shape=(64, 64, 64), seed: int = 0) -> Path:
    """BraTS-2021 layout: out/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz, 1 mm voxels with a
    non-identity affine (RAS-flipped axes, shifted origin); returns out."""
    out = Path(out)
    shape = tuple(int(d) for d in shape)
    for i in range(n):
        case = f"BraTS2021_{i:05d}"
        images, seg = synthetic_volume(shape, slide_seed(seed, i))
        # nibabel axes (i, j, k) = hrvit (x, y, z); 1 mm voxels, x and y flipped as in BraTS (LPS)
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])
        affine[:3, 3] = (shape[2] / 2 + 0.5, shape[1] / 2 + 17.5, -shape[0] / 2 - 20.0)
        for name, image in zip(BRATS_CHANNELS, images):
            write_nifti(out / case / f"{case}_{name}.nii.gz", np.rint(image * 1000).astype(np.int16), affine)
        write_nifti(out / case / f"{case}_seg.nii.gz", seg, affine)
    return out


# --- megapixel recognition (IPS) ---------------------------------------------------------------

MEGAPIXEL_CLASSES = ("disk", "square", "cross", "ring")
"""The label of a megapixel canvas is the shape of its few red target objects; the many grey distractors
take every shape, so finding the red objects (one feature for every class) comes before telling them apart."""

_TARGET_INK = np.array([200, 40, 40], np.float64)
_SHAPES = len(MEGAPIXEL_CLASSES)


class MegapixelCanvas:
    """A large light canvas with grey distractor shapes and `targets` red objects whose shape is the
    label (in the spirit of Megapixel MNIST: the answer sits in a few small places). Objects
    sit one per grid cell of `cell` pixels, so a grid of `cell`-sized candidate patches holds each
    whole; any tile of any level is computed on its own, like SyntheticSlide."""

    def __init__(self, size: int, seed: int, label: int, cell: int = 32, targets: int = 3,
                 distractor_share: float = 0.1):
        rng = np.random.default_rng(seed)
        self.shape, self.cell, self.key = (size, size), cell, int(rng.integers(2**31))
        g = size // cell
        n_cells = g * g
        order = rng.permutation(n_cells)
        n_objects = targets + int(distractor_share * n_cells)
        # per cell (last entry: outside the grid): shape (-1 = empty), radius, centre offset, ink
        self.kind = np.full(n_cells + 1, -1, np.int64)
        self.kind[order[:n_objects]] = rng.integers(0, _SHAPES, n_objects)
        self.radius = np.append(rng.uniform(0.25, 0.38, n_cells) * cell, 1.0)
        self.offset = np.vstack([rng.uniform(-0.08, 0.08, (n_cells, 2)) * cell, [[0, 0]]])
        self.ink = np.repeat(rng.uniform(90, 150, (n_cells + 1, 1)), 3, axis=1)
        self.kind[order[:targets]] = label
        self.ink[order[:targets]] = _TARGET_INK
        self.grid = g

    def image(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        s = 2**level
        ys = (np.arange(y0, y0 + h) + 0.5) * s
        xs = (np.arange(x0, x0 + w) + 0.5) * s
        cy, cx = (ys // self.cell).astype(np.int64), (xs // self.cell).astype(np.int64)
        inside = (cy[:, None] < self.grid) & (cx[None, :] < self.grid)
        cell = np.where(inside, cy[:, None] * self.grid + cx[None, :], len(self.kind) - 1)
        dy = ys[:, None] - (cy[:, None] + 0.5) * self.cell - self.offset[cell, 0]
        dx = xs[None, :] - (cx[None, :] + 0.5) * self.cell - self.offset[cell, 1]
        r, kind = self.radius[cell], self.kind[cell]
        dist = np.hypot(dy, dx)
        box = np.maximum(np.abs(dy), np.abs(dx))
        arm = np.minimum(np.abs(dy), np.abs(dx))
        drawn = np.select(
            [kind == 0, kind == 1, kind == 2, kind == 3],
            [dist <= r, box <= 0.85 * r, (box <= r) & (arm <= r / 3), (dist <= r) & (dist >= 0.55 * r)],
            False)
        noise = _hash(self.key, (ys // s).astype(np.int64)[:, None], (xs // s).astype(np.int64)[None, :])
        paper = 235 + 12 * noise[..., None] * np.ones(3)
        return np.clip(np.where(drawn[..., None], self.ink[cell], paper), 0, 255).astype(np.uint8)


def make_megapixel(out: Path, n: int, size: int = 1024, seed: int = 0, cell: int = 32,
                   val_fraction: float = 0.25, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write out/canvas_XXX.tiff (RGB pyramids) and out/manifest.csv (image,target,split) with
    balanced labels (case i has label i mod 4, so every split sees every class); returns the manifest."""
    from hrvit.data.datasets import assign_splits

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = [f"canvas_{i:03d}" for i in range(n)]
    splits = assign_splits(ids, val_fraction, seed)
    for i, case in enumerate(ids):
        canvas = MegapixelCanvas(size, slide_seed(seed, i), label=i % len(MEGAPIXEL_CLASSES), cell=cell)
        write_pyramid(out / f"{case}.tiff", canvas.shape, canvas.image, channels=3, tile=256)
        if progress:
            progress(i + 1, n)
    rows = [[f"{c}.tiff", i % len(MEGAPIXEL_CLASSES), splits[c]] for i, c in enumerate(ids)]
    return _write_manifest(out, ["image", "target", "split"], rows)


def _write_manifest(out: Path, header: list[str], rows: list[list]) -> Path:
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return manifest
