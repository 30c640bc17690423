"""``moebsr predict``: any image size and mode, folders, class names, and one line per bad path."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import write_untrained_run

from moebsr.cli import main
from moebsr.data.batch_ops import to_model_batch
from moebsr.deploy import export_task
from moebsr.training.export import load_exported_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    run = write_untrained_run(root / "run")
    export_task(run, "digits_parity", root / "parity")
    images = root / "images"
    (images / "more").mkdir(parents=True)
    generator = np.random.default_rng(0)
    Image.fromarray(generator.integers(0, 256, (23, 37), dtype=np.uint8), "L").save(images / "grey.png")
    Image.fromarray(generator.integers(0, 256, (50, 45, 3), dtype=np.uint8), "RGB").save(images / "more" / "rgb.jpg")
    Image.fromarray(generator.integers(0, 256, (31, 29, 4), dtype=np.uint8), "RGBA").save(images / "rgba.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # a png signature, then nothing valid
    (images / "notes.txt").write_text("not an image")  # not an image suffix: a folder's search skips it
    (root / "empty").mkdir()
    return {"run": run, "parity": root / "parity", "images": images, "empty": root / "empty", "root": root}


def _predict(capsys, *argv):
    code = main(["predict", *[str(arg) for arg in argv]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_grey_rgb_rgba_of_odd_sizes_are_predicted_and_each_bad_path_costs_one_line(folders, capsys):
    images, empty = folders["images"], folders["empty"]
    code, printed, errors = _predict(capsys, "--run", folders["run"], "--task", "digits", "--top-k", "3", images,
                                     images / "notes.txt", empty, folders["root"] / "missing.png")
    assert code == 2
    lines = printed.splitlines()
    assert [line.split()[0] for line in lines] == [str(images / name) for name in ("grey.png", "more/rgb.jpg",
                                                                                  "rgba.png")]
    for line in lines:  # three classes each, best first, probabilities that add up to at most 1
        probabilities = [float(part.split()[-1]) for part in line.split(maxsplit=1)[1].split(" · ")]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert errors.splitlines() == [
        f"error: {empty}: the folder holds no image file; accepted: a folder of image files (.png, .jpg, .bmp, "
        ".gif, .tif, .webp and the other suffixes PIL opens)",
        f"error: {folders['root'] / 'missing.png'}: no such file or folder",
        f"error: {images / 'broken.png'}: not an image PIL can read; accepted: image files (png, jpeg, bmp, gif, "
        "tiff, webp, ...)",
        f"error: {images / 'notes.txt'}: not an image PIL can read; accepted: image files (png, jpeg, bmp, gif, "
        "tiff, webp, ...)"]


def test_predictions_are_the_models_own_and_an_exported_task_predicts_the_same(folders, capsys):
    grey = folders["images"] / "grey.png"
    rgba = folders["images"] / "rgba.png"
    code, printed, _ = _predict(capsys, "--run", folders["run"], "--task", "digits_parity", "--json", grey, rgba)
    assert code == 0
    from_run = json.loads(printed)
    # an exported task folder needs no --task; parity has two named classes, so --top-k 5 shows both
    code, printed, _ = _predict(capsys, "--run", folders["parity"], "--json", grey, rgba)
    assert code == 0
    from_export = json.loads(printed)
    assert from_export["tasks"] == from_run["tasks"] == ["digits_parity"] and from_export["errors"] == []
    for run_item, export_item in zip(from_run["predictions"], from_export["predictions"]):
        run_top, export_top = run_item["tasks"]["digits_parity"], export_item["tasks"]["digits_parity"]
        assert [c["name"] for c in run_top] == [c["name"] for c in export_top]
        assert {c["name"] for c in run_top} == {"even", "odd"}
        for run_class, export_class in zip(run_top, export_top):
            assert abs(run_class["probability"] - export_class["probability"]) < 1e-6
    # the same numbers as the model run by hand on the image converted as training converts it
    model, config, _ = load_exported_model(folders["parity"])
    from moebsr.data import ImageSpec
    from moebsr.training.build import image_spec_of
    pixels = torch.from_numpy(np.array(Image.open(grey).convert("RGB"))).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = model.eval()(to_model_batch(pixels, ImageSpec.coerce(image_spec_of(model))),
                                "digits_parity")["digits_parity"].softmax(-1)[0]
    first = from_export["predictions"][0]["tasks"]["digits_parity"]
    assert abs(first[0]["probability"] - expected.max().item()) < 1e-5 and first[0]["class"] == expected.argmax()


def test_predict_refuses_an_unknown_task(folders, capsys):
    grey = folders["images"] / "grey.png"
    assert _predict(capsys, "--run", folders["run"], "--task", "cifar10", grey) == (
        2, "", "error: --task: unknown task 'cifar10'; this run has: digits, digits_parity\n")
    assert _predict(capsys, "--run", folders["run"], "--task", "digits", "--task", "cifar10", grey) == (
        2, "", "error: --task: unknown task 'cifar10'; this run has: digits, digits_parity\n")
    assert _predict(capsys, "--run", folders["run"], "--task", "digits", "--top-k", "0", grey) == (
        2, "", "error: --top-k: 0 is invalid; accepted: an integer >= 1\n")


def test_a_multitask_run_predicts_every_task_in_one_pass_with_each_tasks_own_numbers(folders, capsys, monkeypatch):
    """Without --task a multitask run was refused ("required for a run of several tasks"): one pass of the shared
    trunk answering every task is the point of a multitask model."""
    from moebsr.model import MoEViT
    grey, rgba = folders["images"] / "grey.png", folders["images"] / "rgba.png"
    calls = []
    forward = MoEViT.forward
    monkeypatch.setattr(MoEViT, "forward", lambda self, images, tasks, **kwargs: calls.append(tasks) or
                        forward(self, images, tasks, **kwargs))
    code, printed, errors = _predict(capsys, "--run", folders["run"], "--json", grey, rgba)
    assert (code, errors) == (0, "") and calls == [["digits", "digits_parity"]]  # one forward for both tasks
    together = json.loads(printed)
    assert together["tasks"] == ["digits", "digits_parity"]
    for task in together["tasks"]:  # each task's numbers are those it gets alone
        code, printed, _ = _predict(capsys, "--run", folders["run"], "--task", task, "--json", grey, rgba)
        alone = json.loads(printed)
        for both, single in zip(together["predictions"], alone["predictions"]):
            assert [c["class"] for c in both["tasks"][task]] == [c["class"] for c in single["tasks"][task]]
            assert all(abs(a["probability"] - b["probability"]) < 1e-5
                       for a, b in zip(both["tasks"][task], single["tasks"][task]))
    code, printed, _ = _predict(capsys, "--run", folders["run"], "--top-k", "2", grey)
    line, = printed.splitlines()  # one row per image, one column per task
    assert line.startswith(str(grey)) and " digits: " in line and " | digits_parity: " in line
