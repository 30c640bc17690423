"""Healing a pruned task model: it lowers the task loss (or distils the unpruned model), changes only what the run
trained, is seeded, and ``moebsr export --heal-steps`` records it (and refuses bad values before writing anything)."""

import copy
import itertools
import json

import pytest
import torch
from run_helpers import write_untrained_run
from tiny_models import distinct_experts, images, tiny_moevit

from moebsr.cli import main
from moebsr.deploy import choose_experts, export_task, extract_task, format_report, measure_routing_mass, prune_experts
from moebsr.deploy.heal import DISTILL_TEMPERATURE, distill_loss, heal, unfreeze_for_heal
from moebsr.model.bsr import as_bsr_plan
from moebsr.model.prune import PrunedRouter
from moebsr.tasks.spec import Task

BSR = dict(preset="custom", trainable_blocks=[3], sublayers=["attn", "mlp", "router", "norm"])
PLAN = as_bsr_plan(BSR).resolve(4)
TASK = Task(name="a", num_outputs=10, dataset_fn=lambda split: None)


def _pruned(renormalize: bool = True, with_teacher: bool = False):
    """Task ``a`` of a tiny two-MoE-layer model (block 1 frozen, block 3 trainable), half its experts pruned (and
    the task model before pruning)."""
    model = distinct_experts(tiny_moevit(tasks={"a": 10, "b": 3}, moe=dict(blocks=[1, 3], num_experts=4, top_k=2,
                                                                          renormalize=renormalize), bsr=BSR)).eval()
    single = extract_task(model, "a")
    teacher = copy.deepcopy(single)
    mass = measure_routing_mass(single, "a", [images(8)])
    pruned = prune_experts(single, {index: choose_experts(m.share, "coverage", 0.5) for index, m in mass.items()})
    return (pruned, teacher) if with_teacher else pruned


def _batch():
    return {"images": images(16, seed=3), "labels": torch.arange(16) % 10}


def _loss(model) -> float:
    batch = _batch()
    with torch.no_grad():
        return TASK.loss(model(batch["images"], "a")["a"], batch["labels"]).item()


def test_heal_lowers_the_task_loss_and_is_seeded():
    pruned = _pruned()
    before = _loss(pruned)
    losses = heal(pruned, TASK, itertools.repeat(_batch()), PLAN, steps=20, lr=1e-3, seed=0)
    assert len(losses) == 20 and losses[-1] < losses[0]
    assert _loss(pruned) < 0.8 * before  # measured in eval mode, as deployed
    assert not any(p.requires_grad for p in pruned.parameters()) and not pruned.training
    again = _pruned()
    assert heal(again, TASK, itertools.repeat(_batch()), PLAN, steps=20, lr=1e-3, seed=0) == losses
    for (name, a), b in zip(pruned.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("renormalize", [True, False])
def test_heal_changes_what_the_run_trained_and_nothing_else(renormalize):
    pruned = _pruned(renormalize)
    chosen = {id(p) for p in unfreeze_for_heal(pruned, PLAN)}
    trainable = {name for name, p in pruned.named_parameters() if id(p) in chosen}
    pruned.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in pruned.named_parameters()}
    heal(pruned, TASK, itertools.repeat(_batch()), PLAN, steps=3, lr=1e-3)
    # the plan's block 3 (its kept experts and gate), the final norm, the head; never the frozen MoE block 1
    assert {".".join(n.split(".")[:3]) for n in trainable if n.startswith("backbone.blocks.")} == \
        {"backbone.blocks.3"}
    assert "heads.a.weight" in trainable and "backbone.blocks.3.mlp.router.gates.a.weight" in trainable
    assert not any(".normalizer." in name for name in trainable)  # the removed experts' rows stay as they were
    if not renormalize:
        assert isinstance(pruned.blocks[3].mlp.router, PrunedRouter) and pruned.blocks[3].mlp.router.normalizer
    for name, parameter in pruned.named_parameters():
        if name in trainable:
            assert not torch.equal(parameter, before[name]), f"{name} did not train"
        else:
            assert torch.equal(parameter, before[name]), f"{name} is frozen but changed"


def _distance(student, teacher) -> float:
    with torch.no_grad():
        batch = images(16, seed=3)
        return distill_loss(TASK, student(batch, "a")["a"], teacher(batch, "a")["a"]).item()


def test_distill_loss_is_the_tempered_kl_divergence_or_the_logit_mse_for_a_task_with_its_own_loss():
    student, teacher = torch.randn(5, 10, generator=torch.Generator().manual_seed(0)), torch.randn(
        5, 10, generator=torch.Generator().manual_seed(1))
    t = DISTILL_TEMPERATURE
    p_teacher, log_student = (teacher / t).softmax(-1), (student / t).log_softmax(-1)
    reference = (p_teacher * (p_teacher.log() - log_student)).sum(-1).mean() * t * t
    torch.testing.assert_close(distill_loss(TASK, student, teacher), reference)
    assert distill_loss(TASK, teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    own = Task(name="a", num_outputs=10, dataset_fn=lambda split: None, loss_fn=lambda x, y: x.sum())
    torch.testing.assert_close(distill_loss(own, student, teacher), ((student - teacher) ** 2).mean())


def test_distilling_brings_the_pruned_model_back_towards_the_unpruned_one_and_ignores_the_labels():
    pruned, teacher = _pruned(with_teacher=True)
    before = _distance(pruned, teacher)
    assert before > 1e-3  # pruning moved the outputs
    losses = heal(pruned, TASK, itertools.repeat(_batch()), PLAN, steps=20, lr=1e-3, teacher=teacher)
    assert losses[0] == pytest.approx(before, rel=1e-4)  # the first step's loss: the pruned model's distance
    assert _distance(pruned, teacher) < 0.5 * before and losses[-1] < losses[0]
    other_labels = ({"images": batch["images"], "labels": (batch["labels"] + 3) % 10} for batch in
                    itertools.repeat(_batch()))
    again, teacher_again = _pruned(with_teacher=True)
    assert heal(again, TASK, other_labels, PLAN, steps=20, lr=1e-3, teacher=teacher_again) == losses
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), teacher_again.state_dict().values()))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_heal_refuses_zero_steps_and_a_non_positive_lr():
    with pytest.raises(ValueError, match=r"--heal-steps: 0 is invalid; accepted: an integer >= 1"):
        heal(_pruned(), TASK, iter([]), PLAN, steps=0, lr=1e-3)
    with pytest.raises(ValueError, match=r"--heal-lr: 0.0 is invalid; accepted: a number > 0"):
        heal(_pruned(), TASK, iter([]), PLAN, steps=1, lr=0.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_untrained_run(tmp_path_factory.mktemp("heal") / "run")


def _files(folder):
    """Every file's bytes; a safetensors file as its tensors and metadata (its header's metadata map is written in
    no fixed key order)."""
    from safetensors import safe_open

    def content(path):
        if path.suffix != ".safetensors":
            return path.read_bytes()
        with safe_open(str(path), "pt") as handle:
            return handle.metadata(), {key: handle.get_tensor(key).numpy().tobytes() for key in handle.keys()}
    return {p.name: content(p) for p in sorted(folder.iterdir())}


def test_heal_steps_zero_is_todays_export_and_a_heal_is_recorded(run_dir, tmp_path):
    out = tmp_path / "digits"
    today = export_task(run_dir, "digits", out, prune=True, threshold=0.2)
    today_files = _files(out)
    zero = export_task(run_dir, "digits", out, prune=True, threshold=0.2, heal_steps=0, overwrite=True)
    assert _files(out) == today_files and "heal" not in zero.section  # the same folder: tensors, metadata, card, config
    assert "healed" not in today_files["README.md"].decode()

    healed = export_task(run_dir, "digits", tmp_path / "healed", prune=True, threshold=0.2, heal_steps=4,
                         heal_lr=2e-4)
    section = json.loads((tmp_path / "healed" / "config.json").read_text())["export"]
    heal_record = section["heal"]
    assert heal_record == healed.section["heal"]
    assert (heal_record["steps"], heal_record["lr"], heal_record["split"], heal_record["batch_size"]) == \
        (4, 2e-4, "train", 16)  # the run's train.batch_size
    assert heal_record["optimizer"] == "adamw" and heal_record["trainable_parameters"] > 0
    assert heal_record["loss"] == "distill"  # the default: towards the task model before pruning
    assert "(pruned: share 0.2; healed: 4 steps at lr 0.0002, distill loss)" in format_report(healed).splitlines()[0]
    assert section["kept_experts"] == today.section["kept_experts"]  # the same pruning, then the heal
    card = (tmp_path / "healed" / "README.md").read_text()
    assert "- healed after pruning: fine-tuned 4 steps on the task's train split" in card
    assert "no longer computes the multitask model's function" in card
    assert _files(tmp_path / "healed")["model.safetensors"] != today_files["model.safetensors"]
    assert healed.metrics["examples"] == today.metrics["examples"]  # measured on the exported files, as always
    assert "a distillation loss towards the task model before pruning" in card

    on_labels = export_task(run_dir, "digits", tmp_path / "on_labels", prune=True, threshold=0.2, heal_steps=4,
                            heal_lr=2e-4, heal_loss="task")
    assert on_labels.section["heal"]["loss"] == "task"
    assert "the task loss on its labels" in (tmp_path / "on_labels" / "README.md").read_text()
    assert _files(tmp_path / "on_labels")["model.safetensors"] != _files(tmp_path / "healed")["model.safetensors"]


@pytest.mark.parametrize("argv, message", [
    (["--heal-steps", "5"], "--heal-steps: 5 heals a pruned model and does nothing without --prune; accepted: add "
                            "--prune, or leave --heal-steps out"),
    (["--prune", "--heal-steps", "-1"], "--heal-steps: -1 is invalid; accepted: an integer >= 0 (0: no heal)"),
    (["--prune", "--heal-steps", "5", "--heal-lr", "0"], "--heal-lr: 0.0 is invalid; accepted: a number > 0"),
    (["--prune", "--heal-steps", "5", "--heal-lr=-1e-4"], "--heal-lr: -0.0001 is invalid; accepted: a number > 0"),
    (["--prune", "--heal-lr", "1e-4"], "--heal-lr: does nothing without --heal-steps; accepted: add --heal-steps N "
                                       "(N >= 1), or leave --heal-lr out"),
    (["--prune", "--heal-steps", "5", "--heal-loss", "mse"], "--heal-loss: 'mse' is invalid; accepted: distill, task"),
    (["--prune", "--heal-loss", "task"], "--heal-loss: does nothing without --heal-steps; accepted: add --heal-steps "
                                         "N (N >= 1), or leave --heal-loss out"),
])
def test_bad_heal_options_are_one_line_and_write_nothing(run_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "x"
    code = main(["export", "--run", str(run_dir), "--task", "digits", "--out", str(out), *argv])
    captured = capsys.readouterr()
    assert (code, captured.out, captured.err.splitlines()) == (2, "", [f"error: {message}"])
    assert not out.exists() and not list(tmp_path.glob(".*export-tmp"))
