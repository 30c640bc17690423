"""Write a few test-split images of the packaged tasks as image files, for trying ``moebsr predict``.

    python scripts/sample_images.py                  # docs/predict_samples/{digits,animals}/...

Each file name holds its true label. The images are saved in the modes and sizes a user's files come in, not the
datasets' own: grey at its size, RGB and RGBA enlarged to odd sizes (predict converts and resizes them as training
does), so the same command shows that any mode and size is taken.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"digits": "sklearn_digits", "animals": "animal_shapes"}
MODES = (("L", None), ("RGB", (45, 37)), ("RGBA", (61, 53)))  # (mode, size or None: the dataset's own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "docs" / "predict_samples"))
    parser.add_argument("--per-task", type=int, default=3)
    args = parser.parse_args()
    from moebsr.data.packaged import ANIMAL_CLASSES, packaged_split

    for task, source in SOURCES.items():
        split = packaged_split(source, "test")
        folder = Path(args.out) / task
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(args.per_task):
            mode, size = MODES[index % len(MODES)]
            label = int(split.labels[index])
            name = ANIMAL_CLASSES[label] if task == "animals" else str(label)
            image = Image.fromarray(split.images[index, 0].numpy())
            if size is not None:
                image = image.resize(size, Image.BILINEAR)
            if mode == "RGBA":
                pixels = np.asarray(image.convert("RGB"))
                image = Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)]), "RGBA")
            else:
                image = image.convert(mode)
            image.save(folder / f"{index}_{name}_{mode.lower()}.png")
            print(folder / f"{index}_{name}_{mode.lower()}.png")


if __name__ == "__main__":
    main()
