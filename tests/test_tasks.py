"""Task registry, discovery, shipped tasks, hub tasks on a local stand-in, and the promised errors."""

from __future__ import annotations

import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from run_helpers import isolated_caches

from moebsr.cli import main as cli_main
from moebsr.data import ImageSpec, build_joint_loader, build_task_loader
from moebsr.data.packaged import seeded_split
from moebsr.tasks import (
    DatasetUnavailableError,
    MacroF1,
    TaskError,
    TopK,
    create_task,
    discover_tasks,
    list_tasks,
    task_source,
)

SPEC = ImageSpec(image_size=32, in_chans=3)


@pytest.fixture(autouse=True, scope="module")
def caches_in_a_temp_folder(tmp_path_factory):
    """Packaged-data and Hugging Face caches in a temp folder; the hub stays offline."""
    with isolated_caches(tmp_path_factory.mktemp("caches")) as root:
        yield root


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def write_task_file(folder: Path, body: str, filename: str = "my_task.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(textwrap.dedent(body))
    return path


BLOBS_TASK = """
    import numpy as np
    from moebsr.tasks import Task, register_task

    def blobs(split):
        rng = np.random.default_rng(0 if split == "train" else 1)
        labels = rng.integers(0, 3, 48)
        images = (rng.random((48, 16, 16)) * 80 + labels[:, None, None] * 60).astype(np.uint8)
        return {{"images": images, "labels": labels}}

    @register_task("{name}")
    def make(label_smoothing: float = 0.0) -> Task:
        return Task(name="{name}", num_outputs=3, dataset_fn=blobs, label_smoothing=label_smoothing)
"""


def test_new_task_file_in_a_folder_is_found_and_trains_a_step(tmp_path):
    name = unique("blobs")
    path = write_task_file(tmp_path / "user_tasks", BLOBS_TASK.format(name=name))
    discover_tasks([tmp_path / "user_tasks"])
    assert name in list_tasks("blobs_*")
    assert task_source(name) == str(path.resolve())
    task = create_task(name, label_smoothing=0.1)
    assert task.num_examples("train") == 48 and task.label_smoothing == 0.1

    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
                                 embed_dim=64, num_heads=2, num_classes=0)
    model = torch.nn.Sequential(backbone, task.build_head(backbone.num_features))
    before = [p.detach().clone() for p in model.parameters()]
    batch = next(iter(build_task_loader(task, "train", SPEC, batch_size=16, train=True)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = task.loss(model(batch["images"]), batch["labels"])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(changed[-2:]) and sum(changed) > len(changed) // 2  # the head and most of the trunk moved


def test_task_dirs_from_environment(tmp_path, monkeypatch):
    name = unique("envblobs")
    write_task_file(tmp_path / "env_tasks", BLOBS_TASK.format(name=name))
    monkeypatch.setenv("MOEBSR_TASK_DIRS", str(tmp_path / "env_tasks"))
    assert name in list_tasks()


def test_task_file_with_an_error_names_the_file_and_the_error(tmp_path):
    path = write_task_file(tmp_path / "broken", "import numpy\nraise RuntimeError('boom in task file')\n", "bad.py")
    with pytest.raises(TaskError) as caught:
        discover_tasks([tmp_path / "broken"])
    message = str(caught.value)
    assert str(path.resolve()) in message and "RuntimeError: boom in task file" in message
    path.write_text("def oops(:\n")
    with pytest.raises(TaskError, match="SyntaxError"):  # retried after the user edits the file
        discover_tasks([tmp_path / "broken"])


def test_duplicate_task_name_from_another_file_is_an_error(tmp_path):
    name = unique("dup")
    first = write_task_file(tmp_path / "a", BLOBS_TASK.format(name=name))
    second = write_task_file(tmp_path / "b", BLOBS_TASK.format(name=name))
    discover_tasks([tmp_path / "a"])
    discover_tasks([tmp_path / "a"])  # the same file again: a no-op
    with pytest.raises(TaskError, match="duplicate task name") as caught:
        discover_tasks([tmp_path / "b"])
    assert str(first.resolve()) in str(caught.value) and str(second.resolve()) in str(caught.value)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError) as caught:
        create_task("no_such_task")
    assert "no_such_task" in str(caught.value) and "mnist, mnist_parity" in str(caught.value)


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(TaskError, match="unknown option.*colour.*test_fraction"):
        create_task("mnist", colour=True)


@pytest.mark.parametrize("name, train, test, outputs, side", [
    ("animals", 8000, 2000, 10, 28),
    ("mnist", 4000, 1000, 10, 28),
    ("mnist_parity", 4000, 1000, 2, 28),
    ("digits", 1438, 359, 10, 8),
    ("digits_parity", 1438, 359, 2, 8),
])
def test_shipped_offline_tasks_load_with_the_right_sizes_and_labels(name, train, test, outputs, side):
    task = create_task(name)
    assert task.num_outputs == outputs
    for split, size in (("train", train), ("test", test)):
        dataset = task.build_dataset(split)
        assert len(dataset) == size
        assert dataset.images.shape == (size, 1, side, side) and dataset.images.dtype == torch.uint8
        assert set(dataset.labels.unique().tolist()) == set(range(outputs))  # every class present, none outside
        assert dataset.images.float().std() > 10  # real pictures, not blanks
    batch = next(iter(build_task_loader(task, "test", ImageSpec(40, 3), batch_size=8, train=False)))
    assert batch["images"].shape == (8, 3, 40, 40) and batch["labels"].shape == (8,)


def test_splits_are_seeded_stratified_and_disjoint():
    labels = np.repeat(np.arange(5), 20)
    first, second = seeded_split(labels, 0.2, seed=0), seeded_split(labels, 0.2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    train, test = first
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 100
    assert np.bincount(labels[test]).tolist() == [4] * 5
    assert not np.array_equal(seeded_split(labels, 0.2, seed=1)[1], test)
    mnist = create_task("mnist").build_dataset("test")
    other = create_task("mnist", seed=1).build_dataset("test")
    assert not torch.equal(mnist.images, other.images)  # another seed holds out other images
    assert torch.equal(create_task("mnist").build_dataset("test").images, mnist.images)


def test_a_validation_split_is_carved_from_training_data_never_from_test():
    plain, tuned = create_task("digits"), create_task("digits", validation_fraction=0.15)
    train, test = (plain.build_dataset(split).images.reshape(-1, 64) for split in ("train", "test"))
    fit, validation = (tuned.build_dataset(split).images.reshape(-1, 64) for split in ("train", "test"))
    rows = lambda images: {bytes(row.numpy()) for row in images}  # noqa: E731
    assert len(fit) + len(validation) == len(train) and len(validation) == pytest.approx(0.15 * len(train), abs=10)
    assert rows(fit) | rows(validation) == rows(train)  # every validation image is a training image
    assert rows(validation) <= rows(train) and len(rows(validation) - rows(test)) > 0.95 * len(rows(validation))
    assert tuned.shared_dataset != plain.shared_dataset  # joint batches never mix the two layouts
    assert set(tuned.build_dataset("test").labels.tolist()) == set(range(10))  # stratified
    with pytest.raises(TaskError, match="validation_fraction=1.5; accepted: 0 <= value < 1"):
        create_task("mnist", validation_fraction=1.5)


def test_split_cache_on_disk_gives_the_same_arrays(caches_in_a_temp_folder):
    from moebsr.data import packaged
    cached = packaged._split_arrays("sklearn_digits", 0.2, 0)
    assert list((caches_in_a_temp_folder / "moebsr").glob("sklearn_digits-*.npz"))
    images, labels = packaged._sklearn_digits()
    train, test = seeded_split(labels, 0.2, 0)
    assert np.array_equal(cached["test_images"], images[test]) and np.array_equal(cached["train_labels"],
                                                                                   labels[train])


def test_joint_batches_carry_every_tasks_labels():
    mnist, parity = create_task("mnist"), create_task("mnist_parity")
    assert mnist.shared_dataset == parity.shared_dataset
    loader = build_joint_loader([mnist, parity], "train", SPEC, batch_size=32, train=True, seed=3)
    batch = next(iter(loader))
    assert set(batch["labels"]) == {"mnist", "mnist_parity"} and batch["images"].shape == (32, 3, 32, 32)
    assert torch.equal(batch["labels"]["mnist_parity"], batch["labels"]["mnist"] % 2)
    single = next(iter(build_task_loader(mnist, "train", SPEC, batch_size=32, train=True, seed=3)))
    assert torch.equal(single["labels"], batch["labels"]["mnist"])  # same order as the single-task loader


def test_joint_loader_refuses_tasks_on_different_images():
    with pytest.raises(TaskError, match="do not share a dataset"):
        build_joint_loader([create_task("mnist"), create_task("digits")], "train", SPEC, batch_size=8, train=True)
    with pytest.raises(TaskError, match="do not share a dataset"):
        build_joint_loader([create_task("mnist"), create_task("mnist_parity", seed=5)], "train", SPEC, 8, True)


def test_metrics_match_their_definitions():
    from sklearn.metrics import f1_score
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=generator)
    labels = torch.randint(0, 7, (200,), generator=generator)
    assert TopK(1).compute(logits, labels) == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    top5 = logits.topk(5, dim=1).indices
    assert TopK(5).compute(logits, labels) == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item())
    assert MacroF1().compute(logits, labels) == pytest.approx(f1_score(labels, logits.argmax(1), average="macro"))
    task = create_task("animals")
    assert [m.name for m in task.metrics] == ["top1", "top5", "macro_f1"]
    assert all(m.higher_is_better for m in task.metrics)


def test_default_head_and_label_smoothing():
    task = create_task("digits", label_smoothing=0.2)
    head = task.build_head(64)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 10
    logits, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
    assert torch.allclose(task.loss(logits, labels), expected)


# --- the paper's hub tasks on local stand-ins with the same schema -------------------------------------------

def _pictures(count: int, seed: int, size: int = 20) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)) for _ in range(count)]


def make_stand_in(features: dict, splits: dict[str, int], num_classes: int):
    import datasets
    built = {}
    for index, (split, count) in enumerate(splits.items()):
        columns = {}
        for column, feature in features.items():
            if isinstance(feature, datasets.Image):
                columns[column] = _pictures(count, index)
            else:
                columns[column] = [(i * 7 + index) % feature.num_classes for i in range(count)]
        built[split] = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return datasets.DatasetDict(built)


def hub_schema(name: str) -> tuple[dict, dict[str, int]]:
    from datasets import ClassLabel
    from datasets import Image as ImageFeature
    image = ImageFeature()
    return {
        "cifar10": ({"img": image, "label": ClassLabel(num_classes=10)}, {"train": 12, "test": 6}),
        "cifar100": ({"img": image, "fine_label": ClassLabel(num_classes=100), "coarse_label": ClassLabel(
            num_classes=20)}, {"train": 12, "test": 6}),
        "pets": ({"image": image, "label": ClassLabel(num_classes=37), "image_id": ClassLabel(num_classes=50)},
                 {"train": 12, "test": 6}),
        "flowers102": ({"image": image, "label": ClassLabel(num_classes=102)},
                       {"train": 10, "validation": 4, "test": 6}),
        "food101": ({"image": image, "label": ClassLabel(num_classes=101)}, {"train": 12, "validation": 5}),
    }[name]


@pytest.mark.parametrize("name, storage", [("cifar10", "parquet_dir"), ("cifar100", "save_to_disk"),
                                           ("pets", "parquet_files"), ("flowers102", "parquet_dir"),
                                           ("food101", "save_to_disk")])
def test_hub_tasks_run_on_a_local_stand_in(name, storage, tmp_path):
    features, splits = hub_schema(name)
    stand_in = make_stand_in(features, splits, 10)
    folder = tmp_path / name
    if storage == "save_to_disk":
        stand_in.save_to_disk(str(folder))
        options = {"data_dir": str(folder)}
    else:
        folder.mkdir()
        for split, dataset in stand_in.items():
            dataset.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
        options = ({"data_dir": str(folder)} if storage == "parquet_dir" else
                   {"parquet": {split: str(folder / f"{split}-00000-of-00001.parquet") for split in stand_in}})
    task = create_task(name, **options)
    expected_train = splits["train"] + splits.get("validation", 0) if name == "flowers102" else splits["train"]
    expected_test = splits["validation"] if name == "food101" else splits["test"]
    assert task.num_examples("train") == expected_train and task.num_examples("test") == expected_test
    label_column = "fine_label" if name == "cifar100" else "label"
    first_train = stand_in["train"][label_column][:4]
    assert task.build_dataset("train").labels[:4].tolist() == list(first_train)
    batches = list(build_task_loader(task, "train", SPEC, batch_size=4, train=True, seed=0))
    assert len(batches) == expected_train // 4
    assert batches[0]["images"].shape == (4, 3, 32, 32) and batches[0]["images"].dtype == torch.float32
    evaluation = list(build_task_loader(task, "test", SPEC, batch_size=4, train=False))
    assert torch.equal(torch.cat([b["labels"] for b in evaluation]), task.build_dataset("test").labels)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "pets", "flowers102", "food101"])
def test_hub_tasks_offline_fail_fast_with_one_line_saying_how_to_provide_data(name):
    task = create_task(name)
    assert task.size_hint == "hub"
    started = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as caught:
        task.build_dataset("train")
    message = str(caught.value)
    assert time.perf_counter() - started < 10
    assert "\n" not in message and f"task {name!r}" in message and f"data.task_options.{name}.data_dir" in message


def test_column_names_can_be_overridden_for_a_local_copy(tmp_path):
    from datasets import ClassLabel
    from datasets import Image as ImageFeature
    stand_in = make_stand_in({"picture": ImageFeature(), "breed": ClassLabel(num_classes=37)}, {"train": 4, "test": 4},
                             37)
    stand_in.save_to_disk(str(tmp_path / "pets"))
    with pytest.raises(TaskError, match="no image column img"):
        create_task("pets", data_dir=str(tmp_path / "pets"), image_column="img").build_dataset("test")
    task = create_task("pets", data_dir=str(tmp_path / "pets"), image_column="picture", label_column="breed")
    assert task.build_dataset("test").labels.tolist() == list(stand_in["test"]["breed"])


def test_missing_data_directory_is_named(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="data_dir .*nowhere.* does not exist"):
        create_task("cifar10", data_dir=str(tmp_path / "nowhere")).build_dataset("train")
    with pytest.raises(DatasetUnavailableError, match="'imagefolder': option data_dir is required"):
        create_task("imagefolder")
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        create_task("imagefolder", data_dir=str(tmp_path / "nowhere"))


def test_hub_stand_in_with_a_missing_split_is_named(tmp_path):
    features, _ = hub_schema("food101")
    make_stand_in(features, {"train": 4}, 101).save_to_disk(str(tmp_path / "food"))
    with pytest.raises(DatasetUnavailableError, match="no split 'validation'; it has train"):
        create_task("food101", data_dir=str(tmp_path / "food")).build_dataset("test")


def test_imagefolder_task(tmp_path):
    for label, name in enumerate(["cat", "dog", "owl"]):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for index, picture in enumerate(_pictures(10, label, size=12)):
            picture.save(tmp_path / "pics" / name / f"{index}.png")
    task = create_task("imagefolder", data_dir=str(tmp_path / "pics"))
    assert task.num_outputs == 3 and list(task.class_names) == ["cat", "dog", "owl"]
    assert (task.num_examples("train"), task.num_examples("test")) == (24, 6)
    assert np.bincount(task.build_dataset("test").labels.numpy()).tolist() == [2, 2, 2]
    batch = next(iter(build_task_loader(task, "train", SPEC, batch_size=8, train=True)))
    assert batch["images"].shape == (8, 3, 32, 32)


def _picture_tree(root: Path, classes_by_split: dict) -> None:
    for split, classes in classes_by_split.items():
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for index, picture in enumerate(_pictures(3 + label, label, size=12)):
                picture.save(root / split / name / f"{index}.png")


@pytest.mark.parametrize("evaluation", ["validation", "val", "test"])
def test_an_imagefolder_of_split_folders_reads_them_as_splits_not_as_classes(tmp_path, evaluation):
    """The Hugging Face imagefolder layout: train/ and validation/ (or val/, test/) of class folders. Before, this
    trained a 2-class task 'train' vs 'validation' and reported 100 % top-1."""
    _picture_tree(tmp_path / "pics", {"train": ["cat", "dog", "owl"], evaluation: ["cat", "owl"]})
    task = create_task("imagefolder", data_dir=str(tmp_path / "pics"))
    assert task.num_outputs == 3 and list(task.class_names) == ["cat", "dog", "owl"]
    assert (task.num_examples("train"), task.num_examples("test")) == (3 + 4 + 5, 3 + 4)
    # one label set for every split: owl stays 2 in the split that has no dog
    assert np.bincount(task.build_dataset("test").labels.numpy()).tolist() == [3, 0, 4]
    assert np.bincount(task.build_dataset("train").labels.numpy()).tolist() == [3, 4, 5]


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_a_paper_task_reads_a_copy_as_class_folders_whatever_the_hub_calls_its_columns(tmp_path, name, classes):
    """The paper tasks' docstring promises train/ and test/ class folders; CIFAR's hub columns are img and
    (fine_)label, and the folder's columns (image, label) were not found."""
    names = [f"c{index:03d}" for index in range(classes)]
    for split, per_class in (("train", 2), ("test", 1)):
        for label, class_name in enumerate(names):
            (tmp_path / "copy" / split / class_name).mkdir(parents=True)
            for index, picture in enumerate(_pictures(per_class, label % 10, size=8)):
                picture.save(tmp_path / "copy" / split / class_name / f"{index}.png")
    task = create_task(name, data_dir=str(tmp_path / "copy"))
    assert (task.num_examples("train"), task.num_examples("test")) == (2 * classes, classes)
    assert sorted(task.build_dataset("test").labels.tolist()) == list(range(classes))
    batch = next(iter(build_task_loader(task, "train", SPEC, batch_size=4, train=True)))
    assert batch["images"].shape == (4, 3, 32, 32)


def test_a_train_folder_alone_holds_out_a_test_fraction_of_it(tmp_path):
    _picture_tree(tmp_path / "pics", {"train": ["cat", "dog"]})
    task = create_task("imagefolder", data_dir=str(tmp_path / "pics"), test_fraction=0.5)
    assert list(task.class_names) == ["cat", "dog"]
    assert task.num_examples("train") + task.num_examples("test") == 7


@pytest.mark.parametrize("tree, message", [
    ({"train": ["cat"], "validation": ["cat"], "dog": ["x"]},
     r"mixes split folders \['train', 'validation'\] with class folders \['dog'\]; accepted: class folders only"),
    ({"validation": ["cat"], "test": ["cat"]}, r"has split folders \['test', 'validation'\] but no train/; accepted"),
    ({"train": ["cat"], "test": ["cat", "emu"]}, r"test' has classes \['emu'\] that .*train' lacks"),
])
def test_an_imagefolder_that_mixes_layouts_is_refused_in_one_line(tmp_path, tree, message):
    _picture_tree(tmp_path / "pics", tree)
    with pytest.raises(TaskError, match=message) as refused:
        create_task("imagefolder", data_dir=str(tmp_path / "pics"))
    assert "\n" not in str(refused.value)


# --- bad input ----------------------------------------------------------------------------------------------

def make_task(name: str, dataset_fn, num_outputs: int = 3, **fields):
    from moebsr.tasks import Task
    return Task(name=name, num_outputs=num_outputs, dataset_fn=dataset_fn, **fields)


def _two_label_columns():
    import datasets
    features = datasets.Features({"img": datasets.Image(), "coarse_label": datasets.ClassLabel(num_classes=20),
                                  "fine_label": datasets.ClassLabel(num_classes=100)})
    return datasets.Dataset.from_dict({"img": list(_pictures(4, 0, size=8)), "coarse_label": [0, 1, 19, 3],
                                       "fine_label": [0, 50, 99, 7]}, features=features)


def test_a_schema_with_several_class_label_columns_is_refused_until_one_is_named():
    """A CIFAR-100-like schema lists coarse_label (20) before fine_label (100): the first ClassLabel was taken, and a
    100-way task trained on 20 coarse labels without a word."""
    stand_in = _two_label_columns()
    with pytest.raises(TaskError, match=r"several ClassLabel columns \['coarse_label', 'fine_label'\]; pass "
                                        r"label_column= one of them"):
        make_task("cifar_like", lambda split: stand_in, num_outputs=100).build_dataset("train")
    with pytest.raises(TaskError, match=r"label column 'coarse_label' has 20 classes but the task has 100 outputs; "
                                        r"pass label_column= the right column, or num_outputs=20$"):
        make_task("cifar_like", lambda split: stand_in, num_outputs=100,
                  label_column="coarse_label").build_dataset("train")
    fine = make_task("cifar_like", lambda split: stand_in, num_outputs=100, label_column="fine_label")
    assert fine.build_dataset("train").labels.tolist() == [0, 50, 99, 7]
    derived = make_task("coarse_parity", lambda split: stand_in, num_outputs=2, label_column="coarse_label",
                        label_fn=lambda labels: labels % 2)  # a derived task: the column's count is not its own
    assert derived.build_dataset("train").labels.tolist() == [0, 1, 1, 1]


def test_label_outside_the_classes_is_named():
    task = make_task("bad_labels", lambda split: {"images": np.zeros((5, 8, 8), np.uint8),
                                                  "labels": np.array([0, 1, 2, 3, 7])})
    with pytest.raises(TaskError, match=r"task 'bad_labels', split 'train': 2 labels outside .*\[0, 3\): \[3, 7\]"):
        task.build_dataset("train")


def test_empty_split_is_named():
    task = make_task("empty", lambda split: {"images": np.zeros((0, 8, 8), np.uint8), "labels": np.zeros(0, int)})
    with pytest.raises(TaskError, match="task 'empty', split 'test': the split is empty"):
        task.build_dataset("test")


def test_unexpected_image_shape_and_dtype_are_named():
    two_channels = make_task("two_channels", lambda split: {"images": np.zeros((4, 2, 8, 8), np.uint8),
                                                            "labels": np.zeros(4, int)})
    with pytest.raises(TaskError, match=r"task 'two_channels', split 'train': images have shape \(4, 2, 8, 8\)"):
        two_channels.build_dataset("train")
    floats = make_task("floats", lambda split: {"images": np.zeros((4, 8, 8), np.float32), "labels": np.zeros(4)})
    with pytest.raises(TaskError, match="task 'floats'.*dtype torch.float32; expected uint8"):
        floats.build_dataset("train")


def test_image_of_an_unexpected_mode_is_named():
    pairs = [(Image.new("RGB", (8, 8)), 0), (Image.new("F", (8, 8)), 1)]
    task = make_task("float_pictures", lambda split: pairs)
    loader = build_task_loader(task, "train", SPEC, batch_size=2, train=False)
    with pytest.raises(TaskError, match="task 'float_pictures', split 'train', example 1: image of mode 'F'"):
        next(iter(loader))


def test_unknown_split_is_named():
    with pytest.raises(TaskError, match="unknown split 'validation'; accepted: train, test"):
        create_task("digits").build_dataset("validation")


def test_cli_lists_tasks(capsys):
    assert cli_main(["tasks"]) == 0
    output = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in output.splitlines()[1:]}
    assert rows["mnist"][1:4] == ["4000", "1000", "10"] and rows["mnist_parity"][3] == "2"
    assert rows["cifar100"][1:4] == ["hub", "hub", "100"]
    assert "needs data_dir" in output.split("imagefolder")[1].splitlines()[0]
    assert cli_main(["tasks", "no_such_*"]) == 0
    assert cli_main(["tasks", "--task-dir", "/no/such/folder"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_hub_without_offline_flags_fails_fast_when_unreachable(monkeypatch):
    from moebsr.data import hub
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: False)  # as on a machine without network
    with pytest.raises(DatasetUnavailableError, match="hub is unreachable.*pass data_dir=DIR"):
        create_task("pets").build_dataset("test")


def test_cli_lists_a_broken_task_with_its_error_and_goes_on(tmp_path, capsys):
    (tmp_path / "broken_listing.py").write_text(
        "import numpy as np\nfrom moebsr.tasks import Task, register_task\n\n"
        "@register_task('listed_but_empty')\ndef listed_but_empty():\n"
        "    return Task(name='listed_but_empty', num_outputs=2,\n"
        "                dataset_fn=lambda split: {'images': np.zeros((0, 8, 8), np.uint8), 'labels': np.zeros(0)})\n")
    from moebsr.tasks import unregister_task
    try:
        assert cli_main(["tasks", "--task-dir", str(tmp_path)]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
        assert "error" in rows["listed_but_empty"] and "empty" in rows["listed_but_empty"]
        assert rows["mnist"].split()[1:4] == ["4000", "1000", "10"]
    finally:
        unregister_task("listed_but_empty")
