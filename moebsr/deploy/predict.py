"""``moebsr predict``: a task's top classes for image files, from a training run or an exported task model.

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


@dataclass
class Prediction:
    """One image's top classes, best first: ``(class index, class name or None, probability)``."""

    path: str
    top: list[tuple[int, Optional[str], float]]

    def to_dict(self) -> dict:
        return {"file": self.path, "top_k": [{"class": index, "name": name, "probability": probability}
                                             for index, name, probability in self.top]}


@dataclass
class PredictionReport:
    task: str
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
def predict(run_dir: str, paths: Sequence[str], task: Optional[str] = None, top_k: int = DEFAULT_TOP_K,
            keep_rate: Optional[float] = None, batch_size: int = DEFAULT_BATCH_SIZE) -> PredictionReport:
    """Top-``top_k`` classes of ``task`` for every image ``paths`` name (see the module doc)."""
    from tqdm.auto import tqdm

    from ..data.batch_ops import to_model_batch
    from ..evaluate import open_run
    from ..export import read_run_document
    from ..tasks import TaskError

    if top_k < 1:
        raise TaskError(f"--top-k: {top_k} is invalid; accepted: an integer >= 1")
    if batch_size < 1:
        raise TaskError(f"--batch-size: {batch_size} is invalid; accepted: an integer >= 1")
    if not paths:
        raise TaskError("PATH: no image given; accepted: image files or folders of images")
    document = read_run_document(run_dir)
    run_tasks = list(document["task_outputs"])
    if task is None:
        if len(run_tasks) != 1:
            raise TaskError(f"--task: required for a run of several tasks; accepted: {', '.join(run_tasks)}")
        task = run_tasks[0]
    accelerator, model, data = open_run(run_dir, [task], keep_rate)
    network = accelerator.unwrap_model(model).eval()
    spec = data.image_spec
    names = document.get("class_names", {}).get(task)
    report = PredictionReport(task)
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
        probabilities = network(torch.cat(images), task)[task].float().softmax(dim=-1).cpu()
        best = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
        for path, values, indices in zip(loaded, best.values.tolist(), best.indices.tolist()):
            report.predictions.append(Prediction(os.fspath(path), [
                (index, names[index] if names else None, value) for index, value in zip(indices, values)]))
    progress.close()
    return report


def format_predictions(report: PredictionReport) -> str:
    """One line per image: ``path: name 0.981 · name 0.012 · ...`` (class indices where the task has no names)."""
    width = max((len(p.path) for p in report.predictions), default=0)
    return "\n".join(f"{p.path:<{width}}  " + " · ".join(f"{name if name is not None else index} {probability:.3f}"
                                                        for index, name, probability in p.top)
                     for p in report.predictions)
