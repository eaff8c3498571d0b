"""Drawing the synthetic birds: a class's look (shape, hues, plumage pattern) fixed by its index, and one
image of it drawn from a seeded generator (size, position, scale, colours and a noisy gradient background)."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw

SIZE_RANGE = (300, 500)  # width and height, each drawn in this range (inclusive)
MARGIN = 4
GOLDEN = 0.6180339887498949
HUE_WORDS = ("Red", "Orange", "Amber", "Yellow", "Lime", "Green", "Jade", "Teal",
             "Cyan", "Azure", "Blue", "Indigo", "Violet", "Purple", "Magenta", "Rose")
SHAPES = ("ellipse", "box", "wedge")
SHAPE_WORDS = {"ellipse": "Plover", "box": "Boxbill", "wedge": "Wedgewing"}
PATTERNS = ("plain", "striped", "spotted", "barred")


@dataclass(frozen=True)
class ClassStyle:
    """What makes a class recognisable; derived from the class index only."""

    label: int  # 1-based, as in classes.txt
    name: str  # "001.Red_Striped_Plover"
    hue: float
    head_hue: float
    head_value: float
    shape: str
    pattern: str

    @property
    def species(self) -> str:
        return self.name.split(".", 1)[1]


def class_styles(classes: int) -> list[ClassStyle]:
    """Styles of classes 1..classes; names are unique (a numeric suffix breaks ties past 192 classes)."""
    styles, seen = [], {}
    for index in range(classes):
        hue = (0.02 + index * GOLDEN) % 1.0
        shape = SHAPES[index % len(SHAPES)]
        pattern = PATTERNS[(index // len(SHAPES)) % len(PATTERNS)]
        species = f"{HUE_WORDS[int(hue * len(HUE_WORDS))]}_{pattern.capitalize()}_{SHAPE_WORDS[shape]}"
        seen[species] = seen.get(species, 0) + 1
        if seen[species] > 1:
            species = f"{species}_{seen[species]}"
        styles.append(ClassStyle(label=index + 1, name=f"{index + 1:03d}.{species}", hue=hue,
                                 head_hue=(hue + 0.5 + 0.1 * (index % 3)) % 1.0,
                                 head_value=0.3 if index % 2 else 0.9, shape=shape, pattern=pattern))
    return styles



def draw_bird(style: ClassStyle, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One RGB image of a bird of `style` and its bounding box (x, y, width, height) in pixels."""
    width, height = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
    image = _background(width, height, rng)
    body = Image.new("L", (width, height), 0)
    whole = Image.new("L", (width, height), 0)
    geometry = _geometry(width, height, rng)
    _draw_body(ImageDraw.Draw(body), style.shape, geometry)
    image.paste(_hsv(style.hue + rng.uniform(-0.015, 0.015), rng.uniform(0.65, 0.95), rng.uniform(0.65, 0.95)),
                mask=body)
    _draw_pattern(image, body, style.pattern, geometry, rng)
    _draw_head(ImageDraw.Draw(image), style, geometry, rng)
    whole.paste(body)
    _draw_head(ImageDraw.Draw(whole), None, geometry, rng)
    left, top, right, bottom = whole.getbbox()
    return image, (left, top, right - left, bottom - top)


def _background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A muted gradient between four random corner colours, blended with uniform pixel noise.

    Done with PIL's C routines: float numpy arithmetic on the full image was most of the generation time.
    """
    corners = np.array([_hsv(rng.uniform(), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.85))
                        for _ in range(4)], np.uint8).reshape(2, 2, 3)
    gradient = Image.fromarray(corners).resize((width, height), Image.Resampling.BILINEAR)
    noise = Image.frombytes("RGB", (width, height), rng.bytes(width * height * 3))
    return Image.blend(gradient, noise, rng.uniform(0.05, 0.15))


@dataclass(frozen=True)
class _Geometry:
    """Where the bird sits. `x(v)` maps a local x (0 = tail side) to the image, mirrored when facing left."""

    ox: float
    oy: float
    extent_w: float
    facing_right: bool
    body_w: float
    body_h: float
    top: float
    head_r: float

    def x(self, v: float) -> float:
        return self.ox + (v if self.facing_right else self.extent_w - v)

    def y(self, v: float) -> float:
        return self.oy + v

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        xa, xb = sorted((self.x(x0), self.x(x1)))
        return xa, self.y(y0), xb, self.y(y1)

    @property
    def head_center(self) -> tuple[float, float]:
        return self.body_w * 0.85, self.top + self.body_h * 0.1


def _geometry(width: int, height: int, rng: np.random.Generator) -> _Geometry:
    short = min(width, height)
    body_w = short * rng.uniform(0.4, 0.65)
    body_h = body_w * rng.uniform(0.5, 0.75)
    head_r = body_h * rng.uniform(0.28, 0.38)
    top = head_r
    extent_w = max(body_w, body_w * 0.85 + head_r * 1.8)
    extent_h = top + body_h
    ox = rng.uniform(MARGIN, max(MARGIN, width - extent_w - MARGIN))
    oy = rng.uniform(MARGIN, max(MARGIN, height - extent_h - MARGIN))
    return _Geometry(ox, oy, extent_w, bool(rng.integers(0, 2)), body_w, body_h, top, head_r)


def _draw_body(draw: ImageDraw.ImageDraw, shape: str, g: _Geometry) -> None:
    box = g.box(0, g.top, g.body_w, g.top + g.body_h)
    if shape == "ellipse":
        draw.ellipse(box, fill=255)
    elif shape == "box":
        draw.rounded_rectangle(box, radius=g.body_h * 0.15, fill=255)
    else:  # wedge: pointed towards the head
        draw.polygon([(g.x(0), g.y(g.top)), (g.x(g.body_w), g.y(g.top + g.body_h * 0.4)),
                      (g.x(0), g.y(g.top + g.body_h))], fill=255)


def _draw_pattern(image: Image.Image, body: Image.Image, pattern: str, g: _Geometry,
                  rng: np.random.Generator) -> None:
    if pattern == "plain":
        return
    marks = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(marks)
    if pattern == "striped":
        step = g.body_h / rng.uniform(4.5, 6.0)
        for i in range(1, int(g.body_h / step) + 1):
            y = g.y(g.top + i * step)
            draw.rectangle((g.x(0) - g.extent_w, y, g.x(0) + g.extent_w, y + step * 0.45), fill=255)
    elif pattern == "barred":
        step = g.body_w / rng.uniform(3.5, 5.0)
        for i in range(1, int(g.body_w / step) + 1):
            draw.rectangle(g.box(i * step, g.top, i * step + step * 0.4, g.top + g.body_h), fill=255)
    else:  # spotted
        radius = g.body_h * 0.08
        for _ in range(14):
            cx, cy = g.x(rng.uniform(0, g.body_w)), g.y(g.top + rng.uniform(0, g.body_h))
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    colour = (245, 245, 240) if pattern == "spotted" else (25, 25, 30)
    image.paste(colour, mask=ImageChops.multiply(marks, body))


def _draw_head(draw: ImageDraw.ImageDraw, style: ClassStyle | None, g: _Geometry,
               rng: np.random.Generator) -> None:
    """Head, beak and eye; with style None, only the silhouette (255) for the bounding-box mask."""
    cx, cy = g.head_center
    r = g.head_r
    head_fill: int | tuple[int, int, int] = 255
    beak_fill: int | tuple[int, int, int] = 255
    if style is not None:
        head_fill = _hsv(style.head_hue + rng.uniform(-0.015, 0.015), 0.7, style.head_value)
        beak_fill = (235, 170, 40)
    draw.polygon([(g.x(cx + r * 0.8), g.y(cy - r * 0.25)), (g.x(cx + r * 0.8), g.y(cy + r * 0.25)),
                  (g.x(cx + r * 1.8), g.y(cy))], fill=beak_fill)
    draw.ellipse(g.box(cx - r, cy - r, cx + r, cy + r), fill=head_fill)
    if style is not None:
        e = r * 0.15
        draw.ellipse(g.box(cx + r * 0.35 - e, cy - r * 0.3 - e, cx + r * 0.35 + e, cy - r * 0.3 + e),
                     fill=(10, 10, 10))


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)
