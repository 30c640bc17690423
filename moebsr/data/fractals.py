"""FractalDB-style formula-driven images: one class per random iterated function system (IFS), drawn by code.

Kataoka et al. (ACCV 2020) pre-train on images of fractals, one class per IFS; Nakashima et al. (AAAI 2022) show a
DeiT pre-trained on them transfers almost as well as from ImageNet. No image is downloaded or stored in the project:
the systems come from a seeded generator, and the same seed gives the same images on every machine.

- A system has 2-8 affine maps ``x -> A x + t``. ``A = R(theta) diag(s1, s2) R(phi) diag(d1, d2)`` with its singular
  values scaled so the system's sigma-factor ``sum(s1 + 2 s2)`` lies in ``[(5 + N) / 2, (6 + N) / 2]`` (Anderson &
  Farrell, WACV 2022): contractive, neither dust nor a blob. A system whose first render covers less than
  ``min_fill`` of the image (lines, points) is redrawn.
- An instance of a class perturbs its system (each map's matrix scaled by ``1 + 0.1 * noise``, FractalDB's
  parameter weighting), and is drawn by the chaos game, points normalised to the image with a random margin.
- Pixels are point densities, rendered at 2x and averaged down: grey strokes on black, like the digits and
  silhouettes they must transfer to.
"""

from __future__ import annotations

import numpy as np

MIN_MAPS, MAX_MAPS = 2, 8


def _rotation(angle: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def sample_system(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One IFS: ``(matrices [N, 2, 2], translations [N, 2], probabilities [N])``."""
    num_maps = int(rng.integers(MIN_MAPS, MAX_MAPS + 1))
    target = rng.uniform((5 + num_maps) / 2, (6 + num_maps) / 2)
    while True:
        singular = np.sort(rng.uniform(0.05, 1.0, size=(num_maps, 2)), axis=1)[:, ::-1]
        singular *= target / (singular[:, 0] + 2 * singular[:, 1]).sum()
        if singular.max() < 0.98:
            break
    signs = rng.choice([-1.0, 1.0], size=(num_maps, 2))
    matrices = (_rotation(rng.uniform(0, 2 * np.pi, num_maps)) @ (singular[:, :, None] * np.eye(2))
                @ _rotation(rng.uniform(0, 2 * np.pi, num_maps)) @ (signs[:, :, None] * np.eye(2)))
    translations = rng.uniform(-1.0, 1.0, size=(num_maps, 2))
    determinants = np.abs(np.linalg.det(matrices))
    probabilities = np.maximum(determinants, 0.02 * determinants.max() + 1e-6)
    return matrices, translations, probabilities / probabilities.sum()


def render(matrices: np.ndarray, translations: np.ndarray, probabilities: np.ndarray, rng: np.random.Generator,
           image_size: int, margins: np.ndarray, num_points: int = 2048) -> np.ndarray:
    """Chaos game for I instances of one system at once (``matrices [I, N, 2, 2]``, one margin each): uint8
    ``[I, image_size, image_size]`` point densities."""
    instances = matrices.shape[0]
    chains, warmup = 16, 12
    steps = num_points // chains + warmup
    choices = rng.choice(len(probabilities), size=(steps, instances, chains), p=probabilities)
    rows = np.arange(instances)[:, None]
    points = np.zeros((instances, chains, 2))
    kept = []
    for step in range(steps):
        chosen = choices[step]
        points = np.einsum("icjk,ick->icj", matrices[rows, chosen], points) + translations[chosen]
        if step >= warmup:  # the first iterations have not reached the attractor yet
            kept.append(points)
    cloud = np.concatenate(kept, axis=1)  # [I, P, 2]
    low, high = np.percentile(cloud, 0.5, axis=1), np.percentile(cloud, 99.5, axis=1)
    span = np.maximum((high - low).max(axis=1), 1e-6)[:, None, None]
    fine = 2 * image_size
    scale = (1 - 2 * margins)[:, None, None] * fine
    scaled = (cloud - ((low + high) / 2)[:, None]) / span * scale + fine / 2
    inside = np.all((scaled >= 0) & (scaled < fine), axis=2)
    cells = scaled.astype(np.int64)
    flat = (np.arange(instances)[:, None] * fine * fine + cells[..., 1] * fine + cells[..., 0])[inside]
    counts = np.bincount(flat, minlength=instances * fine * fine).reshape(instances, fine, fine).astype(np.float64)
    for index in range(instances):  # density scale per image: its 60th percentile of occupied cells is white
        occupied = counts[index][counts[index] > 0]
        if occupied.size:
            counts[index] = np.minimum(counts[index] / max(1.0, np.percentile(occupied, 60)), 1.0)
    coarse = counts.reshape(instances, image_size, 2, image_size, 2).mean(axis=(2, 4))
    return np.rint(255 * np.sqrt(coarse)).astype(np.uint8)


def fractal_systems(num_classes: int, seed: int = 0, image_size: int = 32, min_fill: float = 0.12
                    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The classes: ``num_classes`` systems, each redrawn until its render covers ``min_fill`` of the image."""
    rng = np.random.default_rng([seed, 0])
    systems = []
    while len(systems) < num_classes:
        system = sample_system(rng)
        matrices, translations, probabilities = system
        first = render(matrices[None], translations, probabilities, rng, image_size, np.array([0.1]))
        if (first > 0).mean() >= min_fill:
            systems.append(system)
    return systems


def fractal_dataset(num_classes: int, images_per_class: int, image_size: int = 32, seed: int = 0,
                    instance_seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [C * I, S, S], labels [C * I])``, class-major, the same for the same arguments.

    The classes depend on ``seed`` only; ``instance_seed`` draws other instances of the same classes (a test split).
    """
    rng = np.random.default_rng([seed, instance_seed])
    images = np.empty((num_classes * images_per_class, image_size, image_size), dtype=np.uint8)
    for label, (matrices, translations, probabilities) in enumerate(fractal_systems(num_classes, seed, image_size)):
        perturbed = matrices * (1 + 0.1 * rng.standard_normal((images_per_class, *matrices.shape)))
        margins = rng.uniform(0.04, 0.2, images_per_class)
        start = label * images_per_class
        images[start:start + images_per_class] = render(perturbed, translations, probabilities, rng, image_size,
                                                        margins)
    return images, np.repeat(np.arange(num_classes), images_per_class)
