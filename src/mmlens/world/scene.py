"""Scenes: one to three flat shapes on a grey background (plain or textured), drawn from a seed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235),
    "yellow": (235, 215, 40), "purple": (160, 60, 200), "orange": (245, 140, 30),
}
SHAPES = ("square", "circle", "triangle", "cross")
SIZES = {"small": (0.13, 0.16), "large": (0.19, 0.23)}  # half-width as a fraction of the image side
BACKGROUNDS = ("plain", "stripes", "checker", "dots")
BG_GREY = 40


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of the width (0 = left)
    y: float  # centre, fraction of the height (0 = top)
    r: float  # half-width, fraction of the side

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def side(self) -> str:
        return "left" if self.x < 0.5 else "right"


@lru_cache(maxsize=16)
def _grid(size: int, ss: int = 1) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = (np.mgrid[0 : size * ss, 0 : size * ss] + 0.5) / ss
    return yy, xx


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one shape centred at pixel (cx, cy) with half-width r pixels."""
    yy, xx = _grid(size)
    return _inside(shape, xx - cx, yy - cy, r)


def shape_coverage(shape: str, cx: float, cy: float, r: float, size: int, ss: int = 4) -> np.ndarray:
    """Fraction of each pixel the shape covers (ss x ss supersampling): antialiased edges."""
    yy, xx = _grid(size, ss)
    inside = _inside(shape, xx - cx, yy - cy, r).astype(np.float32)
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3))


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "square":
        return (np.abs(dx) <= r * 0.92) & (np.abs(dy) <= r * 0.92)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "triangle":  # apex up, base down
        t = (dy + r) / (2 * r)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    if shape == "cross":
        arm = r / 2.8
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; allowed: {SHAPES}")


def background(kind: str, size: int, rng: np.random.RandomState) -> np.ndarray:
    """Low-contrast grey textures, never saturated, so colour always means 'object'."""
    yy, xx = np.mgrid[0:size, 0:size]
    g = np.full((size, size), BG_GREY, dtype=np.float32)
    period = max(4, size // 8)
    if kind == "stripes":
        g += 22 * (((xx + yy) // (period // 2)) % 2)
    elif kind == "checker":
        g += 22 * (((xx // period) + (yy // period)) % 2)
    elif kind == "dots":
        g += 30 * (((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < (period / 4) ** 2)
    elif kind != "plain":
        raise ValueError(f"unknown background {kind!r}; allowed: {BACKGROUNDS}")
    return np.repeat(g[..., None], 3, axis=2)


@dataclass
class Scene:
    objects: tuple[Obj, ...]
    background: str = "plain"
    size: int = 48
    seed: int = 0
    label: str | None = None  # task label when the scene belongs to a split (spurious-cue work)
    meta: dict = field(default_factory=dict)

    @cached_property
    def coverage(self) -> np.ndarray:
        """(n_objects, size, size) float: the fraction of each pixel each object covers."""
        if not self.objects:
            return np.zeros((0, self.size, self.size), np.float32)
        return np.stack([shape_coverage(o.shape, o.x * self.size, o.y * self.size, o.r * self.size, self.size)
                         for o in self.objects])

    @property
    def masks(self) -> np.ndarray:
        """(n_objects, size, size) bool: pixels at least half covered (objects never overlap by construction)."""
        return self.coverage >= 0.5

    @cached_property
    def image(self) -> np.ndarray:
        """(size, size, 3) uint8 RGB, antialiased."""
        img = background(self.background, self.size, np.random.RandomState(self.seed))
        for obj, cov in zip(self.objects, self.coverage):
            img = img * (1 - cov[..., None]) + np.array(COLOURS[obj.colour], np.float32) * cov[..., None]
        return img.clip(0, 255).round().astype(np.uint8)

    @property
    def boxes(self) -> np.ndarray:
        """(n_objects, 4) pixel boxes x0, y0, x1, y1 (inclusive-exclusive) of each mask."""
        out = []
        for m in self.masks:
            ys, xs = np.nonzero(m)
            out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        return np.array(out, dtype=np.int64).reshape(-1, 4)

    def pil(self):
        from PIL import Image

        return Image.fromarray(self.image)

    @property
    def caption(self) -> str:
        """`a large red square on the left and a small blue circle on the right`."""
        parts = [f"a {o.size} {o.colour} {o.shape}" + (f" on the {o.side}" if len(self.objects) > 1 else "")
                 for o in sorted(self.objects, key=lambda o: o.x)]
        return " and ".join(parts)

    @property
    def short_caption(self) -> str:
        """`a red square` (single-object scenes; the zero-shot prompt)."""
        return " and ".join(f"a {o.colour} {o.shape}" for o in sorted(self.objects, key=lambda o: o.x))

    def questions(self, rng: np.random.RandomState | None = None) -> list[tuple[str, str, str]]:
        from .questions import questions

        return questions(self, rng or np.random.RandomState(self.seed + 1))

    def with_object(self, index: int, **changes) -> Scene:
        objs = list(self.objects)
        objs[index] = replace(objs[index], **changes)
        return Scene(tuple(objs), self.background, self.size, self.seed, self.label, dict(self.meta))


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(px):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def apart(objs, size: int, gap_px: int = 2) -> bool:
    """True when no two objects' masks come within `gap_px` pixels of each other and all lie inside."""
    taken = np.zeros((size, size), bool)
    for o in objs:
        if not (o.r <= o.x <= 1 - o.r and o.r <= o.y <= 1 - o.r):
            return False
        m = shape_mask(o.shape, o.x * size, o.y * size, o.r * size * 1.05, size)
        if (m & taken).any():
            return False
        taken |= _dilate(m, gap_px)
    return True


def _place(rng, shapes, radii, size: int, tries: int = 500, gap_px: int = 2) -> list[tuple[float, float]]:
    """Centres, drawn one object at a time, such that the masks keep a gap (checked on the pixels)."""
    for _ in range(tries):
        placed: list[tuple[float, float]] = []
        taken = np.zeros((size, size), bool)
        for shape, r in zip(shapes, radii):
            for _ in range(60):
                x, y = (float(v) for v in rng.uniform(r + 0.01, 1 - r - 0.01, size=2))
                m = shape_mask(shape, x * size, y * size, r * size * 1.05, size)
                if not (m & taken).any():
                    placed.append((x, y))
                    taken |= _dilate(m, gap_px)
                    break
            else:
                break
        if len(placed) == len(shapes):
            return placed
    raise RuntimeError(f"could not place {len(shapes)} objects of radii {radii}")


def make_scene(seed: int, *, n_objects: int | None = None, size: int = 48, background: str | None = "plain",
               distinct: bool = True, colours=None, shapes=None) -> Scene:
    """A seeded scene of 1-3 objects. `distinct`: no two objects share a colour or a shape (so questions
    like 'what colour is the square?' have one answer). `background=None` draws a random texture."""
    rng = np.random.RandomState(seed)
    n = n_objects or int(rng.randint(1, 4))
    cols = list(colours or COLOURS)
    shps = list(shapes or SHAPES)
    if distinct:
        cs = rng.choice(cols, size=n, replace=False)
        ss = rng.choice(shps, size=n, replace=False)
    else:
        cs, ss = rng.choice(cols, size=n), rng.choice(shps, size=n)
    sizes = rng.choice(list(SIZES), size=n)
    radii = [float(rng.uniform(*SIZES[s])) for s in sizes]
    pts = _place(rng, [str(x) for x in ss], radii, size)
    objs = tuple(Obj(str(s), str(c), str(z), x, y, r) for s, c, z, (x, y), r in zip(ss, cs, sizes, pts, radii))
    bg = background if background is not None else str(rng.choice(BACKGROUNDS))
    return Scene(objs, bg, size, seed)


def make_scenes(seeds, **kw) -> list[Scene]:
    return [make_scene(int(s), **kw) for s in seeds]


def single_object_scene(seed: int, colour: str | None = None, shape: str | None = None, *, size: int = 48,
                        size_class: str | None = None, background: str = "plain", centred: bool = False) -> Scene:
    """One object; colour/shape chosen from the seed unless given (zero-shot classification, generation)."""
    rng = np.random.RandomState(seed)
    colour = colour or str(rng.choice(list(COLOURS)))
    shape = shape or str(rng.choice(SHAPES))
    z = size_class or str(rng.choice(list(SIZES)))
    r = float(rng.uniform(*SIZES[z]))
    if centred:
        x = y = 0.5
    else:
        x, y = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
    return Scene((Obj(shape, colour, z, x, y, r),), background, size, seed)
