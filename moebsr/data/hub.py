"""Image datasets through ``datasets``: the Hugging Face hub, or the same data stored locally.

Without the hub (``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` set, or a 2-second connection probe failing, instead of
``datasets``' ~47 s of DNS retries on a machine without network), a hub dataset is read from the local ``datasets``
cache in offline mode, so a cache copied from another machine works; when it is not there, the load fails with one
line that says how to provide the data (a cache with ``HF_DATASETS_OFFLINE=1``, or ``data_dir=``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from ..errors import first_line
from ..tasks.errors import DatasetUnavailableError

PathLike = Union[str, os.PathLike]
_TRUE = ("1", "true", "yes", "on")


def _env_offline() -> bool:
    return any(os.environ.get(var, "").lower() in _TRUE for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


@functools.lru_cache(maxsize=1)
def _hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _how_to_provide(task: str, hub_name: str) -> str:
    return (f"download it where there is a network (datasets.load_dataset({hub_name!r}).save_to_disk(DIR)), "
            f"or put its splits as parquet files or class folders in DIR, then pass data_dir=DIR "
            f"(config: data.task_options.{task}.data_dir=DIR)")


def is_lone_dataset(folder: Path) -> bool:
    """Whether ``folder`` is the ``save_to_disk`` of one ``Dataset`` (no splits), not of a ``DatasetDict``."""
    return (not (folder / "dataset_dict.json").is_file() and (folder / "dataset_info.json").is_file()
            and (folder / "state.json").is_file())


@functools.lru_cache(maxsize=16)
def load_lone_dataset(data_dir: str) -> Any:
    import datasets
    return datasets.load_from_disk(data_dir)


@functools.lru_cache(maxsize=16)
def _load_local(data_dir: str) -> Any:
    import datasets
    if (Path(data_dir) / "dataset_dict.json").is_file():
        return datasets.load_from_disk(data_dir)
    return datasets.load_dataset(data_dir)  # parquet / csv / image folders: the builder is inferred from the files


@functools.lru_cache(maxsize=16)
def _load_parquet(files: tuple[tuple[str, tuple[str, ...]], ...]) -> Any:
    import datasets
    return datasets.load_dataset("parquet", data_files={split: list(paths) for split, paths in files})


@functools.lru_cache(maxsize=16)
def _load_hub(hub_name: str, revision: Optional[str]) -> Any:
    import datasets
    return datasets.load_dataset(hub_name, revision=revision)


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """``HF_DATASETS_OFFLINE=1`` for the calls inside: ``datasets`` reads its cache and never the network. The flags
    are module globals read at import, so they are set there (and restored), not in the environment."""
    import datasets
    import huggingface_hub.constants
    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
             huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
         huggingface_hub.constants.HF_HUB_OFFLINE) = saved


def _load_cached(hub_name: str, revision: Optional[str]) -> Any:
    """``hub_name`` from the local ``datasets`` cache (``HF_DATASETS_CACHE``, e.g. copied from another machine)."""
    import datasets
    return _load_cached_from(hub_name, revision, str(datasets.config.HF_DATASETS_CACHE))


@functools.lru_cache(maxsize=16)
def _load_cached_from(hub_name: str, revision: Optional[str], cache: str) -> Any:
    import datasets
    with _offline_mode():
        return datasets.load_dataset(hub_name, revision=revision)


def select_split(splits: Mapping[str, Any], expression: str, task: str, origin: str) -> Any:
    """``expression`` is a split name or ``a+b`` (concatenated, e.g. Flowers-102's ``train+validation``)."""
    import datasets
    parts = []
    for name in expression.split("+"):
        if name not in splits:
            raise DatasetUnavailableError(f"task {task!r}: {origin} has no split {name!r}; it has "
                                          f"{', '.join(splits) or 'none'}")
        parts.append(splits[name])
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def held_out_split(task: str, dataset: Any, split: str, image_column: Optional[str], label_column: Optional[str],
                   test_fraction: float, seed: int) -> Any:
    """``split`` (``train`` or ``test``) of a dataset saved without splits: a stratified, seeded ``test_fraction``
    is held out as the test split, the rule folder tasks follow (``moebsr.data.packaged.seeded_split``)."""
    import numpy as np

    from .image_datasets import _hf_columns
    from .packaged import seeded_split
    _, label_column = _hf_columns(dataset, image_column, label_column, f"task {task!r}")
    labels = np.asarray(dataset.select_columns([label_column]).with_format("numpy")[label_column])
    if labels.dtype.kind not in "iu":  # refused by as_image_dataset, which names the column; no strata meanwhile
        labels = np.zeros(len(labels), dtype=np.int64)
    train, test = seeded_split(labels, test_fraction, seed)
    return dataset.select((train if split == "train" else test).tolist())


def load_image_dataset(task: str, hub_name: str, split: str, *, data_dir: Optional[PathLike] = None,
                       parquet: Optional[Mapping[str, Union[PathLike, Sequence[PathLike]]]] = None,
                       revision: Optional[str] = None) -> Any:
    """The ``split`` expression of a dataset: from ``data_dir`` (``save_to_disk`` output, parquet files named by
    split, or image folders), from ``parquet`` (split -> file(s)), or else from the hub as ``hub_name``.

    Raises:
        DatasetUnavailableError: the data cannot be loaded here; the message says how to provide it.
    """
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DatasetUnavailableError(f"task {task!r}: data_dir {str(folder)!r} does not exist or is not a folder")
        return select_split(_load_local(str(folder.resolve())), split, task, f"data_dir {str(folder)!r}")
    if parquet is not None:
        files = []
        for name, paths in parquet.items():
            paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
            missing = [str(p) for p in paths if not Path(p).expanduser().is_file()]
            if missing:
                raise DatasetUnavailableError(f"task {task!r}: parquet file(s) for split {name!r} not found: "
                                              f"{', '.join(missing)}")
            files.append((name, tuple(str(Path(p).expanduser().resolve()) for p in paths)))
        return select_split(_load_parquet(tuple(sorted(files))), split, task, "the parquet files")
    if _env_offline() or not _hub_reachable():
        try:  # no network to try: the local datasets cache or nothing
            splits = _load_cached(hub_name, revision)
        except (ConnectionError, OSError, ValueError) as error:  # not cached (FileNotFoundError, ConnectionError...)
            offline = "offline mode is on" if _env_offline() else "the Hugging Face hub is unreachable"
            raise DatasetUnavailableError(_not_cached(task, hub_name, f"{offline} and", error)) from None
        return select_split(splits, split, task, f"cached hub dataset {hub_name!r}")
    try:
        splits = _load_hub(hub_name, revision)
    except (ConnectionError, OSError) as error:  # a network failure after the probe: the cache may still have it
        try:
            splits = _load_cached(hub_name, revision)
        except (ConnectionError, OSError, ValueError):
            raise DatasetUnavailableError(_not_cached(task, hub_name, "loading from the hub failed and", error)) \
                from None
    return select_split(splits, split, task, f"hub dataset {hub_name!r}")


def _not_cached(task: str, hub_name: str, situation: str, error: BaseException) -> str:
    import datasets
    return (f"task {task!r}: {situation} {hub_name!r} is not in the datasets cache {datasets.config.HF_DATASETS_CACHE} "
            f"({first_line(error)}); copy a datasets cache that holds it there (or point HF_DATASETS_CACHE at it) "
            f"and set HF_DATASETS_OFFLINE=1, or {_how_to_provide(task, hub_name)}")
