"""``moebsr tokens``: which examples its rows show."""

import torch
from run_helpers import write_untrained_run

from moebsr.analysis.token_map import pick_examples, plot_kept_tokens
from moebsr.tasks import create_task, discover_tasks


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    for start in range(0, len(images), batch_size):
        yield {"images": images[start:start + batch_size], "labels": {"t": labels[start:start + batch_size]},
               "indices": torch.arange(start, min(start + batch_size, len(images)))}


def test_the_picked_examples_are_distinct_images_one_per_class_first():
    images = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    images[3] = images[0]  # an exact duplicate, as the animal silhouettes hold
    labels = torch.tensor([9, 3, 7, 5, 1, 9, 6, 2, 4, 0, 8, 3])
    chosen, indices, classes = pick_examples(_batches(images, labels, 5), "t", 6, num_classes=10)
    assert indices == [0, 1, 2, 4, 6, 7] and classes == [9, 3, 7, 1, 6, 2]  # not 3 (copy of 0), not 5 (a second 9)
    torch.testing.assert_close(chosen, images[indices], rtol=0, atol=0)
    # fewer classes than rows: one of each, then the next distinct images in split order
    _, indices, classes = pick_examples(_batches(images, labels % 2, 5), "t", 4, num_classes=2)
    assert indices == [0, 1, 2, 6] and classes == [1, 1, 1, 0]
    # a split smaller than the rows asked for: every distinct image once
    _, indices, _ = pick_examples(_batches(images[:4], labels[:4], 5), "t", 6, num_classes=10)
    assert indices == [0, 1, 2]


def test_the_digits_rows_are_six_different_images_of_six_classes(tmp_path):
    """scikit-learn digits' test examples 0 and 5 are two 9s of one hand that differ by a few grey levels: drawn as
    the first six rows they read as one image shown twice (rows 1 and 6)."""
    run = write_untrained_run(tmp_path / "run", tasks=("digits",))
    drawn = plot_kept_tokens(str(run), tmp_path / "tokens.png", "digits", num_images=6)
    discover_tasks([])
    test_images = create_task("digits").build_dataset("test").images
    shown = test_images[drawn.examples].reshape(6, -1)
    assert len(set(drawn.examples)) == 6 and len(set(drawn.classes)) == 6, (drawn.examples, drawn.classes)
    assert all(not torch.equal(shown[i], shown[j]) for i in range(6) for j in range(i + 1, 6))
    assert (tmp_path / "tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
