"""Formula-driven contour images (RCDB / VisualAtom style): one class per radial wave function, drawn as strokes.

Kataoka et al. (CVPR 2022, RCDB) and Takashima et al. (CVPR 2023, VisualAtom) pre-train ViTs on line drawings of
closed contours, one class per generating formula, and find them as good as or better than fractals: a ViT attends
to object outlines, and contours are outlines. Here a class is a radial function

    r(theta) = 1 + sum_k a_k sin(n_k theta + phi_k),   k = 1..3, frequencies n_k in 1..12

drawn as 1-4 concentric orbits (scaled copies) over a class-specific arc (a closed contour or an open stroke).
An instance jitters the amplitudes by 10 %, turns the drawing by up to 15 degrees, and scales, shifts and
re-thickens it. Orientation belongs to the class, as it does for digits. Images are drawn
at 2x with PIL and averaged down, grey strokes on black; everything comes from a seeded generator.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

POINTS = 160  # samples along a contour


def contour_classes(num_classes: int, seed: int = 0) -> list[dict]:
    """The classes' formulas; distinct by construction (no two share frequencies, orbit count and arc)."""
    rng = np.random.default_rng([seed, 10])
    classes, seen = [], set()
    while len(classes) < num_classes:
        frequencies = tuple(int(n) for n in np.sort(rng.choice(np.arange(1, 13), size=3, replace=False)))
        orbits = int(rng.integers(1, 5))
        arc = float(rng.choice([1.0, 1.0, 0.75, 0.5]))
        key = (frequencies, orbits, arc)
        if key in seen:
            continue
        seen.add(key)
        amplitudes = rng.uniform(0.05, 0.35, size=3) / np.arange(1, 4)  # the lowest frequency dominates
        classes.append(dict(frequencies=np.array(frequencies, dtype=np.float64), amplitudes=amplitudes,
                            phases=rng.uniform(0, 2 * np.pi, 3), orbits=orbits, arc=arc,
                            orbit_ratio=float(rng.uniform(0.45, 0.8)), rotation=rng.uniform(0, 2 * np.pi),
                            start=rng.uniform(0, 2 * np.pi)))
    return classes


def draw_contour(formula: dict, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """One instance of a class: uint8 ``[image_size, image_size]``."""
    fine = 2 * image_size
    canvas = Image.new("L", (fine, fine), 0)
    draw = ImageDraw.Draw(canvas)
    amplitudes = formula["amplitudes"] * (1 + 0.1 * rng.standard_normal(3))
    # orientation is part of a class (a 6 is no rotated 9): instances turn by at most 15 degrees
    rotation = formula["rotation"] + rng.uniform(-np.pi / 12, np.pi / 12)
    start = formula["start"] + rng.uniform(-np.pi / 12, np.pi / 12)
    theta = start + np.linspace(0, 2 * np.pi * formula["arc"], POINTS)
    radius = 1 + (amplitudes[:, None] * np.sin(formula["frequencies"][:, None] * theta
                                                + formula["phases"][:, None])).sum(0)
    scale = rng.uniform(0.3, 0.45) * fine / max(1.0, radius.max())
    centre = fine / 2 + rng.uniform(-0.08, 0.08, size=2) * fine
    width = int(rng.integers(2, 5))
    for orbit in range(formula["orbits"]):
        size = scale * formula["orbit_ratio"] ** orbit
        xs = centre[0] + size * radius * np.cos(theta + rotation)
        ys = centre[1] + size * radius * np.sin(theta + rotation)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=255, width=width, joint="curve")
    pixels = np.asarray(canvas, dtype=np.float32).reshape(image_size, 2, image_size, 2).mean(axis=(1, 3))
    return np.rint(pixels).astype(np.uint8)


def contour_dataset(num_classes: int, images_per_class: int, image_size: int = 32, seed: int = 0,
                    instance_seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [C * I, S, S], labels [C * I])``, class-major; ``instance_seed`` draws other instances."""
    rng = np.random.default_rng([seed, instance_seed])
    images = np.empty((num_classes * images_per_class, image_size, image_size), dtype=np.uint8)
    for label, formula in enumerate(contour_classes(num_classes, seed)):
        for instance in range(images_per_class):
            images[label * images_per_class + instance] = draw_contour(formula, rng, image_size)
    return images, np.repeat(np.arange(num_classes), images_per_class)
