"""The formula-driven pretraining data: seeded, deterministic, distinct classes, and no downstream image in it."""

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from moebsr.config import load_config
from moebsr.data.fractals import fractal_dataset, fractal_systems, sample_system
from moebsr.tasks import create_task, discover_tasks

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BACKBONE = REPO / "backbones" / "formula_vit_6x128_28px.safetensors"
DOWNSTREAM = ["mnist", "mnist_parity", "digits", "digits_parity", "animals"]


def test_same_seed_same_images_other_seed_other_classes():
    first, labels = fractal_dataset(6, 4, seed=3)
    again, _ = fractal_dataset(6, 4, seed=3)
    other, _ = fractal_dataset(6, 4, seed=4)
    assert first.shape == (24, 32, 32) and first.dtype == np.uint8
    assert labels.tolist() == [c for c in range(6) for _ in range(4)]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    test_split, _ = fractal_dataset(6, 4, seed=3, instance_seed=2)  # same classes, other instances
    assert not np.array_equal(first, test_split)


def test_systems_are_contractive_and_renders_are_neither_empty_nor_full():
    rng = np.random.default_rng(0)
    for _ in range(50):
        matrices, translations, probabilities = sample_system(rng)
        assert 2 <= len(matrices) <= 8 and probabilities.sum() == pytest.approx(1.0)
        assert np.linalg.norm(matrices, ord=2, axis=(1, 2)).max() < 1.0  # every map shrinks: an attractor exists
    images, _ = fractal_dataset(20, 3, seed=0)
    fill = (images > 0).reshape(len(images), -1).mean(axis=1)
    assert fill.min() > 0.03 and fill.max() < 0.9


def test_classes_are_distinct_a_nearest_class_mean_tells_new_instances_apart():
    classes = 20
    train, train_labels = fractal_dataset(classes, 20, seed=0, instance_seed=1)
    test, test_labels = fractal_dataset(classes, 5, seed=0, instance_seed=2)
    means = np.stack([train[train_labels == c].reshape(20, -1).mean(0) for c in range(classes)]).astype(np.float64)
    distances = ((test.reshape(len(test), 1, -1).astype(np.float64) - means[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == test_labels).mean()
    assert accuracy >= 0.6, accuracy  # chance is 0.05; a pixel-space nearest mean is a weak classifier
    assert len({s[1].tobytes() for s in fractal_systems(classes, seed=0)}) == classes


def test_no_downstream_image_reaches_pretraining():
    config = load_config(CONFIGS / "pretrain.yaml")
    discover_tasks()
    pretraining = {name: create_task(name, **config.data.task_options.get(name, {})) for name in config.tasks}
    assert not set(pretraining) & set(DOWNSTREAM)
    assert all(task.source.startswith("generated") for task in pretraining.values())
    downstream_sources = {create_task(name).shared_dataset.split(":")[0] for name in DOWNSTREAM}
    assert downstream_sources == {"mnist_subset", "sklearn_digits", "animal_shapes"}
    assert not any(source in (task.shared_dataset or "") for task in pretraining.values()
                   for source in downstream_sources)
    # the committed backbone says it came from that config, unmodified, and the quickstart fine-tunes from it
    metadata = safe_open(str(BACKBONE), "pt").metadata()
    assert metadata["pretrain_config"] == "pretrain.yaml" and "tasks" not in metadata["overrides"]
    assert Path(load_config(CONFIGS / "quickstart.yaml").model.checkpoint).name == BACKBONE.name
