"""Short ways for task files to build the common kinds of task: packaged offline data, hub datasets, image folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .errors import DatasetUnavailableError, TaskError
from .spec import SPLITS, Task

PathLike = Union[str, os.PathLike]


def packaged_task(name: str, source: str, num_outputs: int, *, test_fraction: float = 0.2, seed: int = 0,
                  validation_fraction: float = 0.0, **fields: Any) -> Task:
    """A task on a dataset shipped in a pip package (``moebsr.data.packaged.SOURCES``), split with a fixed seed.

    ``validation_fraction`` > 0 holds out that share of the *training* examples as the task's ``test`` split, for
    tuning without touching the test split. The default ``shared_dataset`` key names source, fractions and seed,
    so tasks on the same split share batches.
    """
    from ..data.packaged import SOURCES, packaged_split
    if source not in SOURCES:
        raise TaskError(f"task {name!r}: unknown packaged source {source!r}; known: {', '.join(SOURCES)}")
    if not 0.0 <= validation_fraction < 1.0:
        raise TaskError(f"task {name!r}: validation_fraction={validation_fraction}; accepted: 0 <= value < 1")
    holdout = f":validation{validation_fraction:g}" if validation_fraction else ""
    fields.setdefault("shared_dataset", f"{source}:test{test_fraction:g}{holdout}:seed{seed}")
    fields.setdefault("source", f"package {SOURCES[source][1]}{' (validation split)' if holdout else ''}")
    return Task(name=name, num_outputs=num_outputs,
                dataset_fn=lambda split: packaged_split(source, split, test_fraction, seed, validation_fraction),
                **fields)


def generated_task(name: str, generate: Callable[..., tuple[Any, Any]], *, num_classes: int, images_per_class: int,
                   test_images_per_class: int, image_size: int, seed: int, version: int, source: str,
                   **fields: Any) -> Task:
    """A task on images drawn by seeded code, ``generate(num_classes, per_class, image_size, seed, instance_seed)``
    (train instances come from ``instance_seed`` 1, test instances of the same classes from 2), cached on disk under a
    key that names every argument and the generator's ``version``."""
    from ..data.cache import cached_arrays

    def dataset_fn(split: str) -> dict:
        per_class = images_per_class if split == "train" else test_images_per_class
        key = f"{name}-v{version}-c{num_classes}-i{per_class}-s{image_size}-seed{seed}-{split}"

        def build() -> dict:
            images, labels = generate(num_classes, per_class, image_size, seed, 1 if split == "train" else 2)
            return {"images": images, "labels": labels}
        return cached_arrays(key, build)
    fields.setdefault("size_hint", f"{num_classes * images_per_class} generated")
    return Task(name=name, num_outputs=num_classes, dataset_fn=dataset_fn, source=f"generated ({source})", **fields)


def hub_task(name: str, hub_name: str, num_outputs: int, *, splits: Optional[Mapping[str, str]] = None,
             data_dir: Optional[PathLike] = None, parquet: Optional[Mapping[str, Any]] = None,
             revision: Optional[str] = None, test_fraction: float = 0.2, seed: int = 0, **fields: Any) -> Task:
    """A task on a Hugging Face hub dataset, or on the same data stored locally (``data_dir`` or ``parquet``).

    A ``data_dir`` holding the ``save_to_disk`` of one ``Dataset`` (no splits) has a stratified, seeded
    ``test_fraction`` of it held out as the test split, as a folder of class folders has.

    Args:
        splits: Our split (``train``/``test``) -> the dataset's split expression (``train+validation``...).
    """
    from ..data.hub import held_out_split, is_lone_dataset, load_image_dataset, load_lone_dataset
    if not 0.0 < test_fraction < 1.0:
        raise TaskError(f"task {name!r}: test_fraction={test_fraction}; accepted: 0 < value < 1")
    splits = dict(splits or {split: split for split in SPLITS})
    lone = data_dir is not None and is_lone_dataset(Path(data_dir).expanduser())

    def dataset_fn(split: str, image_column: Optional[str] = fields.get("image_column"),
                   label_column: Optional[str] = fields.get("label_column")) -> Any:
        if lone:
            whole = _with_hub_columns(load_lone_dataset(str(Path(data_dir).expanduser().resolve())), image_column,
                                      label_column)
            return held_out_split(name, whole, split, image_column, label_column, test_fraction, seed)
        dataset = load_image_dataset(name, hub_name, splits[split], data_dir=data_dir, parquet=parquet,
                                     revision=revision)
        return _with_hub_columns(dataset, image_column, label_column) if data_dir is not None else dataset
    local = data_dir is not None or parquet is not None
    fields.setdefault("source", f"local {data_dir}" if data_dir is not None else
                      "local parquet" if parquet is not None else f"hub {hub_name}")
    fields.setdefault("size_hint", None if local else "hub")
    fields.setdefault("shared_dataset", hub_name if data_dir is None else
                      f"{hub_name}@{data_dir}" + (f":test{test_fraction:g}:seed{seed}" if lone else ""))
    return Task(name=name, num_outputs=num_outputs, dataset_fn=dataset_fn, **fields)


def _with_hub_columns(dataset: Any, image_column: Optional[str], label_column: Optional[str]) -> Any:
    """A local folder of class folders loads with the columns ``image``/``label``, whatever the hub dataset calls
    them (CIFAR's ``img``, ``fine_label``): renamed to the task's, so its columns are found."""
    for wanted, folder_column in ((image_column, "image"), (label_column, "label")):
        if wanted and wanted not in dataset.features and folder_column in dataset.features:
            dataset = dataset.rename_column(folder_column, wanted)
    return dataset


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


SPLIT_FOLDERS = ("train", "test", "validation", "val")  # the Hugging Face imagefolder layout's split folders
EVALUATION_FOLDERS = ("test", "validation", "val")  # the test split, first found; validation/val stand in for test/


def _split_folders(name: str, folder: Path) -> dict[str, Path]:
    """``{split: folder}`` of a tree of split folders of class folders (empty for a tree of class folders); a tree
    that mixes the two, or whose test split holds classes the train split lacks, is refused."""
    subfolders = _class_folders(folder)
    splits = [s for s in subfolders if s in SPLIT_FOLDERS]
    if not splits:
        return {}
    accepted = ("accepted: class folders only (DIR/<class>/*), or split folders train/ and test/, validation/ or val/, "
                "each of class folders")
    classes = sorted(set(subfolders) - set(splits))
    if classes:
        raise TaskError(f"task {name!r}: data_dir {str(folder)!r} mixes split folders {splits} with class folders "
                        f"{classes}; {accepted}")
    if "train" not in splits:
        raise TaskError(f"task {name!r}: data_dir {str(folder)!r} has split folders {splits} but no train/; {accepted}")
    layout = {"train": folder / "train"}
    evaluation = [s for s in EVALUATION_FOLDERS if s in splits]
    if evaluation:
        layout["test"] = folder / evaluation[0]
    train_classes = set(_class_folders(layout["train"]))
    for split, path in layout.items():
        unknown = sorted(set(_class_folders(path)) - train_classes)
        if unknown:
            raise TaskError(f"task {name!r}: {str(path)!r} has classes {unknown} that {str(layout['train'])!r} lacks; "
                            "every evaluated class must be trained")
    return layout


def folder_task(name: str, data_dir: Optional[PathLike], *, num_outputs: Optional[int] = None,
                test_fraction: float = 0.2, seed: int = 0, **fields: Any) -> Task:
    """A task on a folder of class sub-folders (``DIR/<class>/*.png``), or of split folders of class sub-folders
    (``train/`` with ``test/``, ``validation/`` or ``val/``, the Hugging Face imagefolder layout; validation serves as
    the test split when there is no ``test/``). Without an evaluation folder, a stratified ``test_fraction`` of the
    images is held out."""
    if data_dir is None:
        raise DatasetUnavailableError(f"task {name!r}: option data_dir is required: a folder of class sub-folders "
                                      f"(config: data.task_options.{name}.data_dir=DIR)")
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DatasetUnavailableError(f"task {name!r}: data_dir {str(folder)!r} does not exist or is not a folder")
    layout = _split_folders(name, folder)
    root = layout.get("train", folder)
    classes = _class_folders(root)
    if not classes:
        raise TaskError(f"task {name!r}: data_dir {str(root)!r} has no class sub-folders")
    if num_outputs is not None and num_outputs != len(classes):
        raise TaskError(f"task {name!r}: num_outputs={num_outputs} but {str(root)!r} has {len(classes)} classes")
    held_out = "test" not in layout

    def dataset_fn(split: str) -> Any:
        import datasets

        from ..data.packaged import seeded_split
        if not held_out:  # one load for every split: a class missing from a split keeps the others' label ids
            files = {part: str(path.resolve() / "**") for part, path in layout.items()}
            return datasets.load_dataset("imagefolder", data_files=files)[split]
        everything = datasets.load_dataset("imagefolder", data_dir=str(root.resolve()))["train"]
        labels = everything.select_columns(["label"]).with_format("numpy")["label"]
        train, test = seeded_split(labels, test_fraction, seed)
        return everything.select((train if split == "train" else test).tolist())
    fields.setdefault("source", f"folder {folder}")
    fields.setdefault("shared_dataset", f"folder:{folder.resolve()}:test{test_fraction:g}:seed{seed}")
    return Task(name=name, num_outputs=len(classes), dataset_fn=dataset_fn, class_names=classes, **fields)


def parity(labels: Any) -> Any:
    """Label function of derived parity tasks: 0 for even, 1 for odd (a plain function, so it pickles)."""
    return labels % 2


def at_least_five(labels: Any) -> Any:
    return (labels >= 5).long()


__all__: Sequence[str] = ("packaged_task", "generated_task", "hub_task", "folder_task", "parity", "at_least_five")
