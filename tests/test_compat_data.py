"""Data layouts as users have them: each is written into a temp folder, then trained 2 steps and evaluated through the
real entry (``run_training_cli``), or refused in one line before training.

``DATA_LAYOUTS`` is read by the docs to render the table of supported layouts: keep ``name``, ``description`` and
``refusal`` plain strings.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import REPO, isolated_caches, short_run_overrides

from moebsr.data.image_columns import pixel_layout
from moebsr.data.image_datasets import TensorImageDataset
from moebsr.tasks import TaskError, create_task, discover_tasks
from moebsr.training.runner import run_training_cli

FULL = REPO / "configs" / "quickstart_full.yaml"
CLASSES = ("cat", "dog", "owl")
LAYOUT_TASK = '''
from typing import Optional

from moebsr.tasks import Task, register_task
from moebsr.tasks.builders import hub_task


@register_task("layout")
def layout(data_dir: Optional[str] = None, hub_name: str = "moebsr-test/layout", test_fraction: float = 0.2,
           seed: int = 0) -> Task:
    return hub_task("layout", hub_name, 3, data_dir=data_dir, test_fraction=test_fraction, seed=seed,
                    metrics=["top1", "macro_f1"])
'''


@dataclass(frozen=True)
class DataLayout:
    """One way users store an image classification dataset.

    ``build(folder)`` writes it under ``folder`` and returns ``{"task", "options"}`` (the task and its
    ``data.task_options``) with, for a supported layout, ``"test_examples"`` and ``"class_names"`` (None: the
    layout names no classes) to check, and ``"no_network"`` for a machine without network nor offline flags.
    ``refusal`` is None when the layout trains, else a regex of the one-line refusal."""

    name: str
    description: str
    build: Callable[[Path], dict]
    refusal: Optional[str] = None


# --- fixtures: 3 classes of tiny pictures -------------------------------------------------------------------

def _pixels(label: int, index: int, size: int = 12) -> np.ndarray:
    """A uint8 HxWx3 picture whose colour says its class (so 2 steps can see something)."""
    rng = np.random.default_rng(100 * label + index)
    picture = rng.integers(0, 64, (size, size, 3), dtype=np.uint8)
    picture[..., label] += 150
    return picture


def _rows(per_class: int, offset: int = 0) -> list[tuple[np.ndarray, int]]:
    return [(_pixels(label, offset + index), label) for label in range(len(CLASSES)) for index in range(per_class)]


SPLIT_SIZES = {"train": 4, "test": 2}  # per class


def _class_folders(root: Path, per_class: int, offset: int = 0, classes=CLASSES) -> None:
    for picture, label in _rows(per_class, offset):
        if CLASSES[label] in classes:
            (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(root / CLASSES[label] / f"{len(list((root / CLASSES[label]).iterdir()))}.png")


def _png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def _hub_dataset(column: Any, to_value: Callable[[np.ndarray], Any], per_class: int, offset: int = 0,
                 name: str = "image", extra: Optional[dict] = None):
    """A ``datasets.Dataset`` of the class pictures, its image column ``name`` of feature ``column``."""
    import datasets
    rows = _rows(per_class, offset)
    features = {name: column, "label": datasets.ClassLabel(names=list(CLASSES)), **(extra or {})}
    values = {name: [to_value(picture) for picture, _ in rows], "label": [label for _, label in rows]}
    for key, feature in (extra or {}).items():
        values[key] = [label % feature.num_classes for _, label in rows]
    return datasets.Dataset.from_dict(values, features=datasets.Features(features))


def _splits(column: Any, to_value: Callable[[np.ndarray], Any], **kwargs: Any):
    import datasets
    return datasets.DatasetDict({split: _hub_dataset(column, to_value, per_class, offset=10 * number, **kwargs)
                                 for number, (split, per_class) in enumerate(SPLIT_SIZES.items())})


def _hub_layout(folder: Path, **options: Any) -> dict:
    return {"task": "layout", "options": {"data_dir": str(folder), **options},
            "test_examples": SPLIT_SIZES["test"] * len(CLASSES), "class_names": None}


def class_folders(root: Path) -> dict:
    _class_folders(root / "pics", 6)
    return {"task": "imagefolder", "options": {"data_dir": str(root / "pics")}, "test_examples": 3,
            "class_names": list(CLASSES)}


def split_folders(root: Path) -> dict:
    _class_folders(root / "pics" / "train", 4)
    _class_folders(root / "pics" / "validation", 2, offset=10, classes=("cat", "owl"))
    return {"task": "imagefolder", "options": {"data_dir": str(root / "pics")}, "test_examples": 4,
            "class_names": list(CLASSES)}


def split_and_class_folders(root: Path) -> dict:
    _class_folders(root / "pics" / "train", 2)
    _class_folders(root / "pics" / "validation", 1)
    _class_folders(root / "pics", 1, classes=("dog",))
    return {"task": "imagefolder", "options": {"data_dir": str(root / "pics")}}


def saved_dataset_dict(root: Path) -> dict:
    import datasets
    _splits(datasets.Image(), Image.fromarray).save_to_disk(str(root / "saved"))
    return _hub_layout(root / "saved")


def saved_single_dataset(root: Path) -> dict:
    import datasets
    _hub_dataset(datasets.Image(), Image.fromarray, 6).save_to_disk(str(root / "saved"))
    return {**_hub_layout(root / "saved"), "test_examples": 3}  # 20 % of 6 per class, stratified


def parquet_with_image_feature(root: Path) -> dict:
    import datasets
    (root / "parquet").mkdir()
    for split, dataset in _splits(datasets.Image(), Image.fromarray).items():
        dataset.to_parquet(str(root / "parquet" / f"{split}.parquet"))
    return _hub_layout(root / "parquet")


def parquet_of_pyarrow_structs(root: Path) -> dict:
    """What pandas or pyarrow write from a column of ``{"bytes": ..., "path": ...}`` dicts: a struct, no Image()."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (root / "parquet").mkdir()
    for number, (split, per_class) in enumerate(SPLIT_SIZES.items()):
        rows = _rows(per_class, 10 * number)
        table = pa.table({"image": [{"bytes": _png(picture), "path": f"{index}.png"}
                                    for index, (picture, _) in enumerate(rows)],
                          "label": [label for _, label in rows]})
        pq.write_table(table, root / "parquet" / f"{split}.parquet")
    return _hub_layout(root / "parquet")


def array3d_channels_last_uint8(root: Path) -> dict:
    import datasets
    _splits(datasets.Array3D((12, 12, 3), "uint8"), lambda picture: picture, name="pixels").save_to_disk(
        str(root / "saved"))
    return _hub_layout(root / "saved", image_column="pixels")


def nested_lists_channels_first_int64(root: Path) -> dict:
    import datasets
    column = datasets.List(datasets.List(datasets.List(datasets.Value("int64"))))
    _splits(column, lambda picture: picture.transpose(2, 0, 1).astype(np.int64).tolist(), name="pixels").save_to_disk(
        str(root / "saved"))
    return _hub_layout(root / "saved", image_column="pixels")


def array2d_grey_int32(root: Path) -> dict:
    import datasets
    _splits(datasets.Array2D((12, 12), "int32"), lambda picture: picture[..., 0].astype(np.int32),
            name="pixels").save_to_disk(str(root / "saved"))
    return _hub_layout(root / "saved", image_column="pixels")


def out_of_range_integers(root: Path) -> dict:
    import datasets
    column = datasets.List(datasets.List(datasets.List(datasets.Value("int64"))))
    _splits(column, lambda picture: (picture.astype(np.int64) * 2).tolist(), name="pixels").save_to_disk(
        str(root / "saved"))
    return _hub_layout(root / "saved", image_column="pixels")


def float_pixels(root: Path) -> dict:
    import datasets
    _splits(datasets.Array3D((12, 12, 3), "float32"), lambda picture: picture / 255.0, name="pixels").save_to_disk(
        str(root / "saved"))
    return _hub_layout(root / "saved", image_column="pixels")


def ambiguous_channel_axis(root: Path) -> dict:
    import datasets
    _splits(datasets.Array3D((3, 12, 3), "uint8"), lambda picture: picture[:3], name="pixels").save_to_disk(
        str(root / "saved"))
    return _hub_layout(root / "saved", image_column="pixels")


def several_class_label_columns(root: Path) -> dict:
    import datasets
    _splits(datasets.Image(), Image.fromarray, extra={"coarse_label": datasets.ClassLabel(num_classes=2)}).save_to_disk(
        str(root / "saved"))
    return _hub_layout(root / "saved")


def _datasets_cache(root: Path, hub_name: str) -> Path:
    """A ``datasets`` cache holding ``hub_name`` as a hub download leaves it: the Parquet builder (the one a parquet
    hub repo loads with) prepares the Arrow files under ``<name>/default/0.0.0/<hash>/``, and the folder is then
    renamed ``<namespace>___<name>``, the path ``load_dataset(hub_name)`` looks up offline. (The builder refuses a
    ``repo_id`` whose files are not on the hub, hence the rename.)"""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet
    namespace, name = hub_name.split("/")
    files = {}
    for split, dataset in _splits(datasets.Image(), Image.fromarray).items():
        files[split] = [str(root / f"{split}.parquet")]
        dataset.to_parquet(files[split][0])
    builder = Parquet(cache_dir=str(root / "build"), dataset_name=name, config_id="default", hash="0123abcd",
                      data_files=datasets.data_files.DataFilesDict.from_patterns(files))
    builder.download_and_prepare()
    (root / "copied_cache").mkdir()
    (root / "build" / name).rename(root / "copied_cache" / f"{namespace}___{name}")
    return root / "copied_cache"


def copied_datasets_cache(root: Path) -> dict:
    cache = _datasets_cache(root, "moebsr-test/layout-cache")
    return {"task": "layout", "options": {"hub_name": "moebsr-test/layout-cache"}, "no_network": True,
            "datasets_cache": cache, "test_examples": SPLIT_SIZES["test"] * len(CLASSES), "class_names": None}


def hub_unreachable_nothing_cached(root: Path) -> dict:
    (root / "empty_cache").mkdir()
    return {"task": "layout", "options": {"hub_name": "moebsr-test/nowhere"}, "no_network": True,
            "datasets_cache": root / "empty_cache"}


ACCEPTED = r"; accepted: Image\(\), \{bytes, path\} structs or binary of encoded images, or integer arrays of 0-255"
DATA_LAYOUTS = [
    DataLayout("class folders", "DIR/<class>/*.png; a seeded, stratified test_fraction is held out", class_folders),
    DataLayout("split folders", "DIR/train/<class>/ with DIR/test/, DIR/validation/ or DIR/val/ as the test split",
               split_folders),
    DataLayout("split folders mixed with class folders", "DIR/train/, DIR/validation/ and DIR/dog/ side by side",
               split_and_class_folders,
               r"mixes split folders \['train', 'validation'\] with class folders \['dog'\]; accepted: class "
               r"folders only"),
    DataLayout("save_to_disk DatasetDict", "datasets.DatasetDict(...).save_to_disk(DIR), Image() and ClassLabel",
               saved_dataset_dict),
    DataLayout("save_to_disk Dataset", "one datasets.Dataset saved without splits; a seeded, stratified "
               "test_fraction is held out", saved_single_dataset),
    DataLayout("parquet with Image()", "DIR/train.parquet and DIR/test.parquet written by datasets (Image feature)",
               parquet_with_image_feature),
    DataLayout("parquet of {bytes, path} structs", "parquet written by pyarrow or pandas: image column of "
               "{bytes, path} dicts, no Hugging Face features", parquet_of_pyarrow_structs),
    DataLayout("Array3D uint8, channels last", "Array3D((H, W, 3), 'uint8') pixels (image_column=...)",
               array3d_channels_last_uint8),
    DataLayout("nested lists of int64, channels first", "lists of lists of 0-255 integers, C x H x W",
               nested_lists_channels_first_int64),
    DataLayout("Array2D int32 grey", "Array2D((H, W), 'int32') grey pixels of 0-255", array2d_grey_int32),
    DataLayout("integers outside 0-255", "integer pixels above 255 (e.g. 16-bit or doubled values)",
               out_of_range_integers,
               r"image column 'pixels' \(List\(List\(List\(Value\('int64'\)\)\)\)\) holds values \d+\.\.\d{3}; "
               r"integer pixels must be 0-255"),
    DataLayout("float pixels", "float arrays (0-1, 0-255 or normalised: the scale is not recorded)", float_pixels,
               r"image column 'pixels' is Array3D\(shape=\(12, 12, 3\), dtype='float32'\): float pixels are refused "
               r"because their scale .* is not recorded; convert them to integers 0-255" + ACCEPTED),
    DataLayout("channel axis unknown", "3 x W x 3 arrays: channels first or last cannot be told",
               ambiguous_channel_axis,
               r"column 'pixels': pixel array of shape \(3, 12, 3\) could be channels first or channels last"
               + ACCEPTED),
    DataLayout("several ClassLabel columns", "two ClassLabel columns and no label_column",
               several_class_label_columns,
               r"several ClassLabel columns \['label', 'coarse_label'\]; pass label_column= one of them"),
    DataLayout("copied datasets cache", "a ~/.cache/huggingface/datasets copied from a machine with network; no "
               "network here, no offline flag set", copied_datasets_cache),
    DataLayout("hub unreachable, not cached", "no network, no data_dir, the dataset not in the datasets cache",
               hub_unreachable_nothing_cached,
               r"the Hugging Face hub is unreachable and 'moebsr-test/nowhere' is not in the datasets cache .*; copy "
               r"a datasets cache that holds it there .* and set HF_DATASETS_OFFLINE=1, or .* pass data_dir=DIR"),
]


# --- running them -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layout_task_dir(tmp_path_factory):
    """Caches in a temp folder, the hub offline, and the ``layout`` task file (a hub task, as users write them)."""
    from moebsr.data import hub
    root = tmp_path_factory.mktemp("layouts")
    (root / "tasks").mkdir()
    (root / "tasks" / "layout_task.py").write_text(LAYOUT_TASK)
    with isolated_caches(root):
        yield root / "tasks"
        hub._load_cached_from.cache_clear()


def _without_network(monkeypatch, cache: Path) -> None:
    """A machine with no network and no offline flag set: the connection probe fails, ``datasets`` is online."""
    import datasets
    import huggingface_hub.constants

    from moebsr.data import hub
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: False)  # what the 2-second probe answers here, at once


@pytest.mark.parametrize("layout", DATA_LAYOUTS, ids=[layout.name for layout in DATA_LAYOUTS])
def test_data_layout_trains_and_evaluates_or_is_refused_in_one_line(layout, tmp_path, layout_task_dir,
                                                                     monkeypatch, capsys):
    fixture = layout.build(tmp_path)
    if fixture.get("no_network"):
        _without_network(monkeypatch, fixture["datasets_cache"])
    task = fixture["task"]
    output = tmp_path / "run"
    options = [f"data.task_options.{task}.{key}={value}" for key, value in fixture["options"].items()]
    overrides = short_run_overrides(output, 2, [
        f"tasks=[{task}]", f"data.task_dirs=[{layout_task_dir}]", "logging.trackers=[none]",
        "train.sampler=round_robin", "train.batch_size=4", "eval.batch_size=4", *options])
    capsys.readouterr()
    exit_code = run_training_cli(str(FULL), overrides)
    said = capsys.readouterr()
    if layout.refusal is not None:
        assert exit_code == 2, said.out[-2000:]
        lines = said.err.strip().splitlines()
        assert len(lines) == 1 and re.search(layout.refusal, lines[0]), said.err
        assert not (output / "train_log.jsonl").exists()  # refused before the first step
        return
    assert exit_code == 0, said.err[-3000:]
    steps = [json.loads(line)["step"] for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    metrics = json.loads((output / "metrics.json").read_text())["metrics"][task]
    assert metrics["examples"] == fixture["test_examples"] and 0.0 <= metrics["top1"] <= 1.0
    document = json.loads((output / "config.json").read_text())
    assert document["task_outputs"] == {task: len(CLASSES)}
    assert document["class_names"].get(task) == fixture["class_names"]


def test_every_layout_has_a_unique_name_and_one_line_fields():
    names = [layout.name for layout in DATA_LAYOUTS]
    assert len(set(names)) == len(names)
    for layout in DATA_LAYOUTS:
        for text in (layout.name, layout.description, layout.refusal or ""):
            assert isinstance(text, str) and "\n" not in text


# --- the rules the layouts rely on ----------------------------------------------------------------------------

def test_a_single_dataset_holds_out_a_seeded_stratified_test_fraction(tmp_path, layout_task_dir):
    """A paper task on the save_to_disk of one Dataset: before, its test split was missing ('it has train')."""
    import datasets
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10),
                                  "id": datasets.Value("int64")})
    pictures = [Image.fromarray(_pixels(index % 3, index, size=8)) for index in range(50)]
    datasets.Dataset.from_dict({"img": pictures, "label": [index % 10 for index in range(50)],
                                "id": list(range(50))}, features=features).save_to_disk(str(tmp_path / "one"))

    def split_ids(seed: int, fraction: float = 0.2) -> tuple[list, list]:
        task = create_task("cifar10", data_dir=str(tmp_path / "one"), test_fraction=fraction, seed=seed)
        return tuple(sorted(task.dataset_fn(split)["id"]) for split in ("train", "test"))
    train, test = split_ids(3)
    assert not set(train) & set(test) and sorted(train + test) == list(range(50))
    assert len(test) == 10 and sorted(identifier % 10 for identifier in test) == list(range(10))  # one per class
    assert split_ids(3) == (train, test) and split_ids(4)[1] != test
    assert len(split_ids(3, 0.4)[1]) == 20
    assert create_task("cifar10", data_dir=str(tmp_path / "one"), seed=3).num_examples("test") == 10
    _hub_dataset(datasets.Array3D((12, 12, 3), "uint8"), lambda picture: picture, 5, name="pixels").save_to_disk(
        str(tmp_path / "pixels"))  # a column users name themselves
    discover_tasks([layout_task_dir])
    pixels = create_task("layout", data_dir=str(tmp_path / "pixels"), image_column="pixels")
    assert (pixels.num_examples("train"), pixels.num_examples("test")) == (12, 3)
    with pytest.raises(TaskError, match=r"task 'cifar10': test_fraction=1.0; accepted: 0 < value < 1"):
        create_task("cifar10", data_dir=str(tmp_path / "one"), test_fraction=1.0)


@pytest.mark.parametrize("shape, layout", [((8, 9), "HW"), ((8, 9, 3), "HWC"), ((9, 8, 1), "HWC"),
                                           ((4, 8, 9), "CHW"), ((3, 8, 9), "CHW"), ((3, 8, 4), None),
                                           ((8, 9, 2), None), ((2, 8, 9, 3), None)])
def test_the_channel_axis_is_the_one_of_1_3_or_4_at_one_end_only(shape, layout):
    if layout is None:
        with pytest.raises(ValueError, match=re.escape(str(shape))):
            pixel_layout(shape)
    else:
        assert pixel_layout(shape) == layout


def test_in_memory_arrays_may_be_channels_last_or_integers_of_0_to_255():
    channels_last = np.stack([_pixels(label, 0) for label in range(3)])
    labels = np.arange(3)
    reference = TensorImageDataset(channels_last.transpose(0, 3, 1, 2), labels)
    channels_first_int16 = channels_last.transpose(0, 3, 1, 2).astype(np.int16)
    for images in (channels_last, channels_last.astype(np.int64), channels_first_int16):
        assert torch.equal(TensorImageDataset(images, labels).images, reference.images)
    with pytest.raises(TaskError, match=r"images of dtype torch.int64 hold values 0\.\.\d+; integer pixels must be 0-"):
        TensorImageDataset(channels_last.astype(np.int64) * 2, labels)
    with pytest.raises(TaskError, match=r"dtype torch.float64; expected uint8 or integer pixels 0-255 \(float pixels"):
        TensorImageDataset(channels_last / 255.0, labels)
    with pytest.raises(TaskError, match=r"shape \(3, 3, 12, 3\), channels first or last cannot be told apart"):
        TensorImageDataset(np.zeros((3, 3, 12, 3), np.uint8), labels)


def test_a_hub_load_that_fails_midway_falls_back_to_the_datasets_cache(tmp_path, layout_task_dir, monkeypatch):
    """The probe passed but the download broke (a proxy, a timeout): the cache is tried before refusing."""
    from moebsr.data import hub
    cache = _datasets_cache(tmp_path, "moebsr-test/flaky")
    _without_network(monkeypatch, cache)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: True)

    def broken_download(hub_name: str, revision: Optional[str]) -> Any:
        raise ConnectionError(f"Couldn't reach '{hub_name}' on the Hub (ReadTimeout)")
    monkeypatch.setattr(hub, "_load_hub", broken_download)
    discover_tasks([layout_task_dir])
    assert create_task("layout", hub_name="moebsr-test/flaky").num_examples("test") == 6
    with pytest.raises(TaskError, match=r"loading from the hub failed and 'moebsr-test/gone' is not in the datasets "
                                        r"cache .*\(Couldn't reach 'moebsr-test/gone' on the Hub \(ReadTimeout\)\); "
                                        r"copy a datasets cache .*HF_DATASETS_OFFLINE=1, or .*data_dir=DIR"):
        create_task("layout", hub_name="moebsr-test/gone").num_examples("test")
