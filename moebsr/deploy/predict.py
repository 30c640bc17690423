"""``moebsr predict``: the top classes of every task (or those asked for) for image files, from a training run or an
exported task model; one forward of the shared trunk answers every task of an image.

Images of any size and mode are read with PIL, converted to the model's colour mode as training converts them
(``to_pil``), resized whole to the model's input and normalised (``to_model_batch``, as the packaged tasks are
evaluated), and run in batches. A path that cannot be used (missing, not an image, an empty folder) costs one line
naming it; every other image is still predicted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

DEFAULT_TOP_K = 5
DEFAULT_BATCH_SIZE = 64


TopClasses = list[tuple[int, Optional[str], float]]  # best first: (class index, class name or None, probability)


@dataclass
class Prediction:
    """One image's top classes for each predicted task."""

    path: str
    top: dict[str, TopClasses]

    def to_dict(self) -> dict:
        return {"file": self.path, "tasks": {task: [{"class": index, "name": name, "probability": probability}
                                                    for index, name, probability in classes]
                                             for task, classes in self.top.items()}}


@dataclass
class PredictionReport:
    tasks: list[str]
    predictions: list[Prediction] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def image_suffixes() -> list[str]:
    """File suffixes PIL can open (``.png``, ``.jpg``, ...): what a folder's images are recognised by."""
    from PIL import Image
    return sorted({suffix.lower() for suffix in Image.registered_extensions()})


def gather_images(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The image files ``paths`` name (folders searched recursively, in sorted order; a file named on its own is
    tried whatever its suffix), and one error per path that yields none."""
    suffixes = set(image_suffixes())
    files, errors = [], []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                errors.append(f"{given}: the folder holds no image file; accepted: a folder of image files (.png, "
                              ".jpg, .bmp, .gif, .tif, .webp and the other suffixes PIL opens)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            errors.append(f"{given}: no such file or folder")
    return files, errors


def read_image(path: Path, in_chans: int) -> torch.Tensor:
    """uint8 ``[C, H, W]`` in the model's colour mode; raises ``ValueError`` with one line naming the file."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from ..data.image_datasets import to_pil
    from ..tasks import TaskError

    try:
        with Image.open(path) as opened:
            opened.load()
            image = to_pil(opened, in_chans, os.fspath(path))
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image PIL can read; accepted: image files "
                         "(png, jpeg, bmp, gif, tiff, webp, ...)") from None
    except (OSError, SyntaxError) as error:  # truncated or corrupt data, unreadable file
        raise ValueError(f"{path}: unreadable image ({str(error).splitlines()[0] if str(error) else 'corrupt'})") \
            from None
    except TaskError as error:
        raise ValueError(str(error)) from None
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(pixels))


@torch.no_grad()
def predict(run_dir: str, paths: Sequence[str], tasks: Optional[Sequence[str]] = None, top_k: int = DEFAULT_TOP_K,
            keep_rate: Optional[float] = None, batch_size: int = DEFAULT_BATCH_SIZE) -> PredictionReport:
    """Top-``top_k`` classes of each of ``tasks`` (default: every task of the folder) for every image ``paths`` name
    (see the module doc)."""
    from tqdm.auto import tqdm

    from ..data.batch_ops import to_model_batch
    from ..tasks import TaskError
    from ..training.evaluate import open_run
    from ..training.export import read_run_document

    if top_k < 1:
        raise TaskError(f"--top-k: {top_k} is invalid; accepted: an integer >= 1")
    if batch_size < 1:
        raise TaskError(f"--batch-size: {batch_size} is invalid; accepted: an integer >= 1")
    if not paths:
        raise TaskError("PATH: no image given; accepted: image files or folders of images")
    document = read_run_document(run_dir)
    run_tasks = list(document["task_outputs"])
    tasks = list(dict.fromkeys(tasks)) if tasks else run_tasks
    for task in tasks:
        if task not in run_tasks:
            raise TaskError(f"--task: unknown task {task!r}; this run has: {', '.join(run_tasks)}")
    accelerator, model, data = open_run(run_dir, tasks, keep_rate)
    network = accelerator.unwrap_model(model).eval()
    spec = data.image_spec
    names = {task: document.get("class_names", {}).get(task) for task in tasks}
    report = PredictionReport(tasks)
    files, report.errors = gather_images(paths)
    progress = tqdm(total=len(files), desc="predict", unit="image", disable=len(files) <= batch_size or None)
    for start in range(0, len(files), batch_size):
        loaded, images = [], []
        for path in files[start:start + batch_size]:
            try:
                images.append(to_model_batch(read_image(path, spec.in_chans)[None], spec, accelerator.device))
                loaded.append(path)
            except ValueError as error:
                report.errors.append(str(error))
        progress.update(len(files[start:start + batch_size]))
        if not images:
            continue
        outputs = network(torch.cat(images), tasks)  # one pass of the shared trunk for every task
        tops: dict[str, list[TopClasses]] = {}
        for task in tasks:
            probabilities = outputs[task].float().softmax(dim=-1).cpu()
            best = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
            tops[task] = [[(index, names[task][index] if names[task] else None, value)
                           for index, value in zip(indices, values)]
                          for values, indices in zip(best.values.tolist(), best.indices.tolist())]
        for row, path in enumerate(loaded):
            report.predictions.append(Prediction(os.fspath(path), {task: tops[task][row] for task in tasks}))
    progress.close()
    return report


def format_predictions(report: PredictionReport) -> str:
    """One line per image, one column per task: ``path  name 0.981 · name 0.012`` for one task, ``path  task: name
    0.981 · ... | task2: ...`` for several (class indices where a task has no names)."""
    width = max((len(p.path) for p in report.predictions), default=0)
    labelled = len(report.tasks) > 1

    def column(task: str, classes: TopClasses) -> str:
        ranked = " · ".join(f"{name if name is not None else index} {probability:.3f}"
                            for index, name, probability in classes)
        return f"{task}: {ranked}" if labelled else ranked
    return "\n".join(f"{p.path:<{width}}  " + " | ".join(column(task, p.top[task]) for task in report.tasks)
                     for p in report.predictions)
