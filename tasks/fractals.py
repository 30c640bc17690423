"""Formula-driven pretraining images, drawn by seeded code (``moebsr.data.fractals``, ``moebsr.data.contours``).

No downstream image is in them: every picture comes from a random formula, one class per formula, so a backbone
pretrained on these (``configs/pretrain.yaml``) has never seen a digit or an animal.
"""

from moebsr.data.contours import contour_dataset
from moebsr.data.fractals import fractal_dataset
from moebsr.tasks import BatchAugment, Task, register_task
from moebsr.tasks.builders import generated_task

AUGMENT = BatchAugment(crop_padding=2, hflip=False)  # mirror-invariant features would confuse 2 with 5 downstream


@register_task("fractaldb")
def fractaldb(num_classes: int = 1000, images_per_class: int = 100, test_images_per_class: int = 5,
              image_size: int = 32, seed: int = 0) -> Task:
    """FractalDB-style: one class per random iterated function system."""
    return generated_task("fractaldb", fractal_dataset, num_classes=num_classes, images_per_class=images_per_class,
                          test_images_per_class=test_images_per_class, image_size=image_size, seed=seed, version=1,
                          source="seeded IFS fractals", metrics=["top1", "top5"], batch_augment=AUGMENT)


@register_task("contours")
def contours(num_classes: int = 1000, images_per_class: int = 100, test_images_per_class: int = 5,
             image_size: int = 32, seed: int = 0) -> Task:
    """RCDB/VisualAtom-style: one class per radial wave formula, drawn as strokes."""
    return generated_task("contours", contour_dataset, num_classes=num_classes, images_per_class=images_per_class,
                          test_images_per_class=test_images_per_class, image_size=image_size, seed=seed, version=2,
                          source="seeded radial contours", metrics=["top1", "top5"], batch_augment=AUGMENT)
