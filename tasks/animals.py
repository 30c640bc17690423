"""Animal silhouettes (animal-shape-mnist): 10,000 28x28 grey images of 10 animals, 1,000 each; 80/20 split."""

from moebsr.data.packaged import ANIMAL_CLASSES
from moebsr.tasks import BatchAugment, Task, register_task
from moebsr.tasks.builders import packaged_task


@register_task("animals")
def animals(test_fraction: float = 0.2, seed: int = 0, validation_fraction: float = 0.0) -> Task:
    # Label order follows the package's description (alphabetical); silhouettes survive mirroring.
    return packaged_task("animals", "animal_shapes", 10, test_fraction=test_fraction, seed=seed,
                         validation_fraction=validation_fraction,
                         class_names=ANIMAL_CLASSES, metrics=["top1", "top5", "macro_f1"],
                         batch_augment=BatchAugment(crop_padding=2, hflip=True))
