"""The paper's five datasets from the Hugging Face hub (standard splits), or from a local copy via ``data_dir``.

| task | hub name | image / label columns | train | test |
|---|---|---|---|---|
| cifar10 | uoft-cs/cifar10 | img / label | train (50,000) | test (10,000) |
| cifar100 | uoft-cs/cifar100 | img / fine_label | train (50,000) | test (10,000) |
| pets | timm/oxford-iiit-pet | image / label | train (3,680) | test (3,669) |
| flowers102 | dpdl-benchmark/oxford_flowers102 | image / label | train+validation (2,040) | test (6,149) |
| food101 | ethz/food101 | image / label | train (75,750) | validation (25,250) |

Offline: ``datasets.load_dataset(HUB_NAME).save_to_disk(DIR)`` where there is a network, then
``data.task_options.<task>.data_dir=DIR``; a folder of ``train-*.parquet``/``test-*.parquet`` files (hub split
names) or ``train/``, ``test/`` class folders works too; so does the ``save_to_disk`` of one ``Dataset`` without splits,
of which a stratified, seeded ``test_fraction`` is held out as the test split.
"""

from typing import Optional

from moebsr.tasks import Task, register_task
from moebsr.tasks.builders import hub_task

SMALL_PHOTOS = dict(metrics=["top1", "top5"])


@register_task("cifar10")
def cifar10(data_dir: Optional[str] = None, parquet: Optional[dict] = None, revision: Optional[str] = None,
            test_fraction: float = 0.2, seed: int = 0) -> Task:
    return hub_task("cifar10", "uoft-cs/cifar10", 10, data_dir=data_dir, parquet=parquet, revision=revision,
                    test_fraction=test_fraction, seed=seed, image_column="img", label_column="label", **SMALL_PHOTOS)


@register_task("cifar100")
def cifar100(data_dir: Optional[str] = None, parquet: Optional[dict] = None, revision: Optional[str] = None,
             test_fraction: float = 0.2, seed: int = 0) -> Task:
    return hub_task("cifar100", "uoft-cs/cifar100", 100, data_dir=data_dir, parquet=parquet, revision=revision,
                    test_fraction=test_fraction, seed=seed, image_column="img", label_column="fine_label",
                    **SMALL_PHOTOS)


@register_task("pets")
def pets(data_dir: Optional[str] = None, parquet: Optional[dict] = None, revision: Optional[str] = None,
         test_fraction: float = 0.2, seed: int = 0) -> Task:
    return hub_task("pets", "timm/oxford-iiit-pet", 37, data_dir=data_dir, parquet=parquet, revision=revision,
                    test_fraction=test_fraction, seed=seed, image_column="image", label_column="label",
                    metrics=["top1", "top5", "macro_f1"])


@register_task("flowers102")
def flowers102(data_dir: Optional[str] = None, parquet: Optional[dict] = None, revision: Optional[str] = None,
               test_fraction: float = 0.2, seed: int = 0) -> Task:
    return hub_task("flowers102", "dpdl-benchmark/oxford_flowers102", 102, data_dir=data_dir, parquet=parquet,
                    revision=revision, test_fraction=test_fraction, seed=seed,
                    splits={"train": "train+validation", "test": "test"}, image_column="image", label_column="label",
                    metrics=["top1", "top5", "macro_f1"])


@register_task("food101")
def food101(data_dir: Optional[str] = None, parquet: Optional[dict] = None, revision: Optional[str] = None,
            test_fraction: float = 0.2, seed: int = 0) -> Task:
    return hub_task("food101", "ethz/food101", 101, data_dir=data_dir, parquet=parquet, revision=revision,
                    test_fraction=test_fraction, seed=seed, splits={"train": "train", "test": "validation"},
                    image_column="image", label_column="label", **SMALL_PHOTOS)
