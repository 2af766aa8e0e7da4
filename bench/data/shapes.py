"""Procedural shapes, textures and backgrounds shared by the two embedded datasets.

Every shape is a set of polygons in unit coordinates (fills minus holes), so the same
rasterizer draws it at any size and rotation and the mask it gives is exact. The target
detection set uses TARGET_SHAPES as its categories; the source classification set (our
ImageNet stand-in) uses all of SHAPES, a superset, the way ImageNet's classes cover and
exceed COCO's. Shapes outside the target set also appear, unlabelled, as clutter in the
target images, the way COCO images hold objects of categories it does not annotate.
"""

import math

import numpy as np
from PIL import Image, ImageDraw


def _regular(n, r=1.0, phase=0.0):
    a = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _star(points, inner):
    a = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _box(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def _heart():
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1) / 17.0


# name -> (fills, holes); every polygon lies inside the unit disc.
SHAPES = {
    # the target categories
    "circle": ([_regular(40)], []),
    "square": ([_regular(4, 1.0, math.pi / 4)], []),
    "triangle": ([_regular(3, 1.0, -math.pi / 2)], []),
    "star": ([_star(5, 0.45)], []),
    "ring": ([_regular(40)], [_regular(40, 0.55)]),
    "cross": ([_box(-0.33, -1, 0.33, 1), _box(-1, -0.33, 1, 0.33)], []),
    "hexagon": ([_regular(6)], []),
    "crescent": ([_regular(40)], [_regular(40, 0.85) + np.array([0.45, -0.2])]),
    # source-only classes (clutter in the target images)
    "pentagon": ([_regular(5, 1.0, -math.pi / 2)], []),
    "octagon": ([_regular(8, 1.0, math.pi / 8)], []),
    "ellipse": ([_regular(40) * np.array([1.0, 0.5])], []),
    "diamond": ([np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], dtype=float)], []),
    "trapezoid": ([np.array([[-1, 0.6], [1, 0.6], [0.5, -0.6], [-0.5, -0.6]], dtype=float)], []),
    "semicircle": ([np.concatenate([_regular(40)[:21], [[-1.0, 0.0]]]) - np.array([0, 0.4])], []),
    "arrow": ([np.array([[-1, -0.25], [0.2, -0.25], [0.2, -0.7], [1, 0], [0.2, 0.7], [0.2, 0.25],
                         [-1, 0.25]], dtype=float)], []),
    "heart": ([_heart()], []),
    "ell": ([np.array([[-0.8, -1], [-0.2, -1], [-0.2, 0.4], [0.8, 0.4], [0.8, 1], [-0.8, 1]],
                      dtype=float)], []),
    "tee": ([_box(-1, -1, 1, -0.4), _box(-0.3, -1, 0.3, 1)], []),
    "parallelogram": ([np.array([[-1, 0.5], [0.4, 0.5], [1, -0.5], [-0.4, -0.5]], dtype=float)], []),
    "chevron": ([np.array([[-1, -0.6], [0, 0.2], [1, -0.6], [1, 0.1], [0, 0.9], [-1, 0.1]],
                          dtype=float)], []),
    "star4": ([_star(4, 0.35)], []),
    "hexagram": ([_regular(3, 1.0, -math.pi / 2), _regular(3, 1.0, math.pi / 2)], []),
    "frame": ([_regular(4, 1.0, math.pi / 4)], [_regular(4, 0.6, math.pi / 4)]),
    "bar": ([_box(-1, -0.22, 1, 0.22)], []),
}
TARGET_SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent"]
CLUTTER_SHAPES = [s for s in SHAPES if s not in TARGET_SHAPES]


def shape_mask(name, size, center, diameter, angle, aspect, supersample=1):
    """Boolean (H, W) mask of shape `name` with the given pose; `size` is (H, W)."""
    fills, holes = SHAPES[name]
    h, w = size
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    scale = np.array(aspect) * diameter / 2.0

    def place(poly):
        pts = (poly * scale) @ rot.T + np.array(center)
        return [tuple(p) for p in (pts * supersample).tolist()]

    canvas = Image.new("L", (w * supersample, h * supersample), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in fills:
        draw.polygon(place(poly), fill=255)
    for poly in holes:
        draw.polygon(place(poly), fill=0)
    if supersample > 1:
        canvas = canvas.resize((w, h), Image.BILINEAR)
    return np.asarray(canvas) >= 128


def random_color(rng, low=0, high=255):
    return rng.uniform(low, high, size=3).astype(np.float32)


def texture(rng, h, w, color=None, contrast=1.0):
    """A (H, W, 3) float image: solid, stripes, checker, speckle or gradient.

    `contrast` < 1 keeps the second colour near the first, so an object textured this way
    still reads as one region (as a real object does) rather than as two shapes.
    """
    c1 = random_color(rng) if color is None else color
    c2 = np.clip(c1 + contrast * (random_color(rng) - c1), 0, 255)
    kind = rng.integers(5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        t = np.zeros((h, w), np.float32)
    elif kind == 1:  # stripes
        theta, period = rng.uniform(0, math.pi), rng.uniform(3, 10)
        t = (np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period) > 0)
    elif kind == 2:  # checker
        p = int(rng.integers(3, 9))
        t = ((xx // p + yy // p) % 2)
    elif kind == 3:  # speckle
        t = rng.random((h, w)) < 0.3
    else:  # gradient
        theta = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(theta) + yy * math.sin(theta))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    t = np.asarray(t, np.float32)[..., None]
    return c1 * (1 - t) + c2 * t


def background(rng, h, w):
    """Cluttered background: a smooth colour field, a faint texture, strokes and random blobs."""
    grid = rng.uniform(0, 255, size=(3, 3, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), np.float32)
    alpha = rng.uniform(0.05, 0.25)
    img = field * (1 - alpha) + texture(rng, h, w) * alpha
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 5))):  # strokes
        pts = rng.uniform(0, [w, h], size=(2, 2))
        draw.line([tuple(p) for p in pts.tolist()], fill=tuple(int(v) for v in random_color(rng)),
                  width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 4))):  # irregular blobs: not any shape class
        n = int(rng.integers(5, 10))
        a = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.3, 1.0, n) * rng.uniform(3, 12)
        c = rng.uniform(0, [w, h])
        pts = np.stack([c[0] + r * np.cos(a), c[1] + r * np.sin(a)], axis=1)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=tuple(int(v) for v in random_color(rng)))
    return np.asarray(canvas, np.float32)


def object_texture(rng, img, mask):
    """An object's texture whose colour stands out from what lies under it (min distance 90)."""
    under = img[mask].mean(axis=0) if mask.any() else np.full(3, 128.0, np.float32)
    color = random_color(rng)
    for _ in range(8):
        if np.linalg.norm(color - under) >= 90:
            break
        color = random_color(rng)
    return texture(rng, *mask.shape, color=color, contrast=rng.uniform(0.15, 0.5))


def drop_hidden(layers, size):
    """The layers (bottom to top, each a dict with a boolean "mask") that stay visible
    enough, each with its "visible" part (not covered by the layers above it). A layer
    mostly hidden (under 20 pixels, or under 30% of it, visible) is dropped, as an unfair,
    unlabelled target would be; removing one only uncovers the others, so one pass from the
    top is enough."""
    covered = np.zeros(size, bool)
    kept = []
    for layer in reversed(layers):
        full = layer["mask"].sum()
        visible = layer["mask"] & ~covered
        if full == 0 or visible.sum() < 20 or visible.sum() < 0.3 * full:
            continue
        layer["visible"] = visible
        covered |= layer["mask"]
        kept.append(layer)
    kept.reverse()
    return kept


def paint(rng, img, layers):
    """`img` with each layer's full mask painted in a texture that stands out, bottom first."""
    for layer in layers:
        tex = object_texture(rng, img, layer["mask"])
        img = np.where(layer["mask"][..., None], tex, img)
    return img


def random_pose(rng, size, diameter):
    h, w = size
    margin = diameter * 0.3  # objects may be cut by the image border, as in COCO
    center = (rng.uniform(-margin, w + margin - 1), rng.uniform(-margin, h + margin - 1))
    center = (min(max(center[0], 0), w - 1), min(max(center[1], 0), h - 1))
    # Mostly upright, as objects in photos (ImageNet's and COCO's) are: a full-circle
    # rotation made the shape classes too slow to learn for a CPU-sized pre-training.
    return dict(center=center, diameter=diameter, angle=rng.uniform(-0.35, 0.35),
                aspect=(rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)))


def finish(rng, img):
    """Global brightness/contrast jitter and sensor noise, then 8-bit."""
    img = img * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
    img = img + rng.normal(0, 4, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
