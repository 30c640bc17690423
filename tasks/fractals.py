"""Formula-driven pretraining images, drawn by seeded code (``moebsr.data.fractals``, ``moebsr.data.contours``).

No downstream image is in them: every picture comes from a random formula, one class per formula, so a backbone
pretrained on these (``configs/pretrain.yaml``) has never seen a digit or an animal.
"""

from typing import Callable

from moebsr.data.contours import contour_dataset
from moebsr.data.fractals import fractal_dataset
from moebsr.tasks import BatchAugment, Task, register_task
from moebsr.tasks.builders import generated_task

AUGMENT = BatchAugment(crop_padding=2, hflip=False)  # mirror-invariant features would confuse 2 with 5 downstream


def formula_task(name: str, generate: Callable[..., tuple], version: int, source: str) -> Callable[..., Task]:
    """Register a task on ``generate``'s images; its options are the generator's (see ``generated_task``)."""

    def factory(num_classes: int = 1000, images_per_class: int = 100, test_images_per_class: int = 5,
                image_size: int = 32, seed: int = 0) -> Task:
        return generated_task(name, generate, num_classes=num_classes, images_per_class=images_per_class,
                              test_images_per_class=test_images_per_class, image_size=image_size, seed=seed,
                              version=version, source=source, metrics=["top1", "top5"], batch_augment=AUGMENT)
    return register_task(name)(factory)


# FractalDB-style: one class per random iterated function system
fractaldb = formula_task("fractaldb", fractal_dataset, version=1, source="seeded IFS fractals")
# RCDB/VisualAtom-style: one class per radial wave formula, drawn as strokes
contours = formula_task("contours", contour_dataset, version=2, source="seeded radial contours")
