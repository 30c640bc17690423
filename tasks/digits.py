"""scikit-learn's 8x8 digits (1,797 images) and their parity, on the same images."""

from moebsr.tasks import BatchAugment, Task, register_task
from moebsr.tasks.builders import packaged_task, parity

AUGMENT = BatchAugment(crop_padding=1, hflip=False)


@register_task("digits")
def digits(test_fraction: float = 0.2, seed: int = 0, validation_fraction: float = 0.0) -> Task:
    return packaged_task("digits", "sklearn_digits", 10, test_fraction=test_fraction, seed=seed,
                         validation_fraction=validation_fraction,
                         metrics=["top1", "macro_f1"], batch_augment=AUGMENT)


@register_task("digits_parity")
def digits_parity(test_fraction: float = 0.2, seed: int = 0, validation_fraction: float = 0.0) -> Task:
    return packaged_task("digits_parity", "sklearn_digits", 2, test_fraction=test_fraction, seed=seed,
                         validation_fraction=validation_fraction,
                         label_fn=parity, class_names=("even", "odd"), batch_augment=AUGMENT)
