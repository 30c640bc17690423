"""moebsr plan: budgets, the measured cost model, the Fisher-potential importance, the exact search, the CLI."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import distinct_experts, images, tiny_moevit

from moebsr.errors import is_user_error
from moebsr.model.bsr import BSRPlan
from moebsr.planning import PlanError, best_plan, parse_budget, plan_units, units_plan
from moebsr.planning.costs import Measure, measure_cost_model, synthetic_step_measure
from moebsr.planning.importance import fisher_potential
from moebsr.planning.search import RESOLUTION

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"a": 10, "b": 3}
ALL = BSRPlan(preset="all").resolve(4)


@pytest.fixture(scope="module")
def tiny():
    """A 4-block MoE-ViT (MoE in blocks 1 and 3, dropping at block 2) and its measured cost model at batch 4."""
    model = tiny_moevit(TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2),
                        token_drop=dict(blocks=[2], keep_rate=0.5))

    def build(plan):
        model.apply_bsr(plan)
        return model

    step_measure = synthetic_step_measure(TASKS, 4, "no")
    return model, step_measure, measure_cost_model(build, step_measure, 8, ALL)


@pytest.mark.parametrize("text, kind, amount, relative", [
    ("memory=600MiB", "memory", 600 * 2 ** 20, False), ("memory=0.3x", "memory", 0.3, True),
    ("flops=2.5GFLOP", "flops", 2.5e9, False), ("flops=0.4x", "flops", 0.4, True),
    ("memory=1e3KB", "memory", 1e6, False), ("step=80ms", "step", 0.08, False), ("step=0.4x", "step", 0.4, True),
])
def test_budgets_parse(text, kind, amount, relative):
    budget = parse_budget(text)
    assert (budget.kind, budget.amount, budget.relative) == (kind, pytest.approx(amount), relative)


@pytest.mark.parametrize("text, message", [
    ("time=3s", r"^--budget: unknown budget kind 'time' in 'time=3s'; accepted: memory=.*flops="),
    ("600MiB", r"^--budget: unknown budget kind '600MiB'"),
    ("memory=5parsecs", r"^--budget: unknown memory unit 'parsecs' in 'memory=5parsecs'; accepted: B, KB, .*GiB, or x"),
    ("memory=600", r"^--budget: unknown memory unit '\(none\)'"),
    ("flops=2MiB", r"^--budget: unknown flops unit 'MiB'.*accepted: FLOP, KFLOP"),
    ("step=3min", r"^--budget: unknown step unit 'min'.*accepted: s, ms, or x"),
    ("memory=-1x", r"^--budget: cannot read the amount '-1x'"),
    ("memory=0x", r"^--budget: 'memory=0x' is not positive"),
])
def test_bad_budgets_are_one_line_naming_what_is_accepted(text, message):
    with pytest.raises(PlanError, match=message) as refused:
        parse_budget(text)
    assert "\n" not in str(refused.value) and is_user_error(refused.value)


def test_predicted_costs_match_a_measured_step_of_the_same_plan(tiny):
    """The composition path(f) + sum of extras, against a real measurement of plans it was not measured on: a
    plan starting at block 2 stores nothing for blocks 0-1, which a sum of per-unit costs would get wrong."""
    model, step_measure, costs = tiny
    plans = [[(2, "attn")], [(1, "mlp"), (3, "router")], [(0, "attn"), (2, "mlp"), (3, "mlp"), (3, "norm")],
             [(1, "router"), (2, "norm"), (2, "attn")], [(3, "mlp")]]
    for units in plans:
        predicted = costs.predict(units)
        model.apply_bsr(units_plan(units))
        measured = step_measure(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert predicted.trainable_params == trainable
        for quantity in ("saved_bytes", "flops", "parameter_bytes"):
            assert getattr(predicted, quantity) == pytest.approx(getattr(measured, quantity), rel=0.02), \
                (units, quantity)
    late, early = costs.predict([(3, "attn")]), costs.predict([(0, "attn")])
    assert late.saved_bytes < early.saved_bytes and late.flops < early.flops
    assert costs.full.memory_bytes > costs.predict([u for u in costs.units]).memory_bytes * 0.99


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_costs_measured_on_a_few_images_scale_to_the_batch_without_holding_gradients(tiny, precision):
    """Under bf16 autocast every trainable weight's bf16 copy is saved once per step, whatever the batch: scaling the
    bytes of 2 images by 4 overcounted full fine-tuning's; the line through 2 and 4 images does not."""
    model, _, _ = tiny
    for plan in (units_plan([(1, "mlp"), (2, "attn"), (3, "router")]), ALL):
        model.apply_bsr(plan)
        whole = synthetic_step_measure(TASKS, 8, precision)(model)
        few = synthetic_step_measure(TASKS, 8, precision, measure_batch=2)(model)
        assert few.saved_bytes == pytest.approx(whole.saved_bytes, rel=0.01)
        assert few.flops == pytest.approx(whole.flops, rel=0.01)
        assert few.parameter_bytes == whole.parameter_bytes
        assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("precision, recompute", [("no", False), ("bf16", False), ("bf16", True)])
def test_saved_tensors_counted_without_being_kept_read_the_same_and_hold_less(precision, recompute):
    """Measuring counts what a step saves without keeping it (backward gets uninitialised tensors of the same shapes):
    the same bytes and FLOPs as a real step, while the pass holds a fraction of them."""
    from moebsr.analysis.profiling import LiveTensorBytes, saved_activation_bytes, synthetic_labels, training_step_flops
    model = tiny_moevit(TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2, recompute_experts=recompute),
                        token_drop=dict(blocks=[2], keep_rate=0.5))
    batch, labels = images(8), synthetic_labels(TASKS, 8)
    for plan in (units_plan([(2, "attn"), (3, "router")]), ALL):  # the first mixture off the autograd path, then on
        model.apply_bsr(plan)
        held = {}
        for keep in (True, False):
            with LiveTensorBytes() as live:
                saved = saved_activation_bytes(model, batch, labels, precision, keep=keep)
            held[keep] = live.peak
            flops = training_step_flops(model, batch, labels, precision, keep=keep)
            if keep:
                expected = (saved, flops)
        assert (saved, flops) == expected and saved > 0
        assert held[False] < 0.6 * held[True] and held[True] >= expected[0]
        assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("precision, frozen_dtype, collapse", [("no", "fp32", False), ("bf16", "bf16", True)])
def test_full_finetuning_composed_from_the_measured_pieces_equals_its_measured_step(precision, frozen_dtype, collapse):
    """Full fine-tuning is the reference of relative budgets and is not measured (its pass would hold full
    fine-tuning's weight copies and activations): composed as plans are, it reads exactly what a step measures."""
    from moebsr.planning.plan import plan_builder
    build = plan_builder(tiny_moevit(TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2),
                                     token_drop=dict(blocks=[2], keep_rate=0.5)), frozen_dtype, collapse, hollow=True)
    measure = synthetic_step_measure(TASKS, 8, precision, measure_batch=2)
    costs = measure_cost_model(build, measure, 8, ALL)
    if collapse:  # as cost_model_for does: a collapsed mixture's mlp unit is its router too
        costs.full = costs.compose_full([unit for unit in costs.units if unit[1] != "router"])
    full = build(ALL)
    measured = measure(full)
    assert (costs.full.saved_bytes, costs.full.flops, costs.full.parameter_bytes) == (
        measured.saved_bytes, measured.flops, measured.parameter_bytes)
    assert costs.full.trainable_params == sum(p.numel() for p in full.parameters())


def test_the_search_is_exact_against_brute_force_and_deterministic(tiny):
    _, _, costs = tiny
    generator = torch.Generator().manual_seed(3)
    scores = {unit: float(value) for unit, value in zip(costs.units, torch.rand(len(costs.units), generator=generator))}
    every_plan = [units for size in range(len(costs.units) + 1) for units in itertools.combinations(costs.units, size)]
    low, high = costs.predict(()).memory_bytes, costs.full.memory_bytes
    for fraction in (0.1, 0.3, 0.6, 0.9):
        budget = low + fraction * (high - low)
        choice = best_plan(costs, scores, "memory", budget)
        assert choice.cost.memory_bytes <= budget
        assert choice == best_plan(costs, scores, "memory", budget)

        def best_within(limit):
            return max(sum(scores[u] for u in units) for units in every_plan
                       if costs.predict(units).memory_bytes <= limit)
        slack = 2 * len(costs.units) * budget / RESOLUTION  # each unit's cost is rounded up to a step of the budget
        assert best_within(budget - slack) - 1e-9 <= choice.score <= best_within(budget) + 1e-9
    assert best_plan(costs, scores, "memory", low * 0.99) is None


def test_fisher_potential_is_per_image_normalised_per_task_and_leaves_no_gradient(tiny):
    model, _, costs = tiny
    model.apply_bsr(BSRPlan(preset="paper").resolve(4))
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    batch = {"a": [images(4, seed=1)], "b": [images(4, seed=2)]}
    labels = {"a": [torch.tensor([1, 2, 3, 4])], "b": [torch.tensor([0, 1, 2, 0])]}
    whole = fisher_potential(model, batch, labels, costs.units, micro_batch=4)
    single = fisher_potential(model, batch, labels, costs.units, micro_batch=1)
    for unit in costs.units:
        assert single.scores[unit] == pytest.approx(whole.scores[unit], rel=1e-4)
    assert sum(whole.scores.values()) == pytest.approx(2.0)
    assert all(sum(task.values()) == pytest.approx(1.0) for task in whole.per_task.values())
    assert all(value > 0 for unit, value in whole.scores.items() if unit[1] != "router")  # see the test below
    assert all(p.grad is None for p in model.parameters())
    assert before == {name: p.requires_grad for name, p in model.named_parameters()}
    assert whole.images_per_task == {"a": 4, "b": 4}


def test_a_units_score_is_its_outputs_fisher_potential(tiny):
    """Against the definition, for block 3's attention: sum over images and channels of (sum_tokens a*g)^2."""
    model, _, costs = tiny
    batch, target = images(2, seed=5), torch.tensor([3, 7])
    captured = []
    handle = model.blocks[3].attn.proj.register_forward_hook(lambda m, i, o: captured.append(o))
    model.requires_grad_(True).eval()
    loss = torch.nn.functional.cross_entropy(model(batch, ["a"])["a"], target, reduction="sum")
    gradient, = torch.autograd.grad(loss, captured[0])
    handle.remove()
    expected = float((captured[0].detach() * gradient).sum(dim=1).pow(2).sum())
    scores = fisher_potential(model, {"a": [batch]}, {"a": [target]}, costs.units, micro_batch=2)
    assert expected > 0 and scores.raw_per_task["a"][(3, "attn")] == pytest.approx(expected, rel=1e-5)
    assert plan_units(model) == costs.units and len(costs.units) == 4 * 3 + 2  # routers in the 2 MoE blocks only


def test_a_router_among_identical_upcycled_experts_scores_nothing_and_one_among_distinct_experts_does():
    """Upcycled experts are copies, and the renormalised top-k weights sum to 1, so no gate can change the output:
    training that router does nothing for the loss. Scored on its renormalised expert weights (as before), each
    router got 0.6-5.2 % of a task's importance all the same; on its softmax it gets none."""
    model = tiny_moevit(TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2))
    units = plan_units(model)
    batch = {"a": [images(4, seed=1)], "b": [images(4, seed=2)]}
    labels = {"a": [torch.tensor([1, 2, 3, 4])], "b": [torch.tensor([0, 1, 2, 0])]}
    upcycled = fisher_potential(model, batch, labels, units, micro_batch=4)
    distinct = fisher_potential(distinct_experts(model), batch, labels, units, micro_batch=4)
    for block in (1, 3):
        assert upcycled.scores[(block, "router")] < 1e-9
        assert distinct.scores[(block, "router")] > 1e-4
    assert all(upcycled.scores[(block, "mlp")] > 1e-3 for block in (1, 3))


@pytest.mark.parametrize("precision, frozen_dtype, collapse", [("no", "fp32", False), ("no", "bf16", True),
                                                                ("bf16", "bf16", False), ("bf16", "fp32", True)])
def test_costs_measured_on_a_hollow_model_equal_the_real_ones(precision, frozen_dtype, collapse):
    """Measuring holds no weights: the blocks' weight matrices are broadcast zeros, and every cost reads the same
    (the routers stay real, so under autocast as many experts get tokens, and as many cast copies are saved)."""
    from moebsr.planning.costs import held_bytes
    from moebsr.planning.plan import plan_builder

    def model():
        return tiny_moevit(TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2),
                           token_drop=dict(blocks=[2], keep_rate=0.5))
    measure = synthetic_step_measure(TASKS, 8, precision, measure_batch=2)
    real = plan_builder(model(), frozen_dtype, collapse, hollow=False)
    hollow = plan_builder(model(), frozen_dtype, collapse, hollow=True)
    for units in ([], [(2, "attn")], [(1, "mlp"), (3, "norm")], [(0, "norm"), (3, "mlp"), (3, "router")]):
        real_model = real(units_plan(units))
        expected = measure(real_model)
        hollow_model = hollow(units_plan(units))
        assert measure(hollow_model) == expected, units
        assert held_bytes(hollow_model) < 0.1 * held_bytes(real_model)  # the stem and heads: most of a tiny model
    assert measure.peak_bytes > 0


def test_timing_plans_with_collapsed_mixtures_survives_experts_its_steps_trained():
    """Step budgets measure real weights and take optimizer steps: a mixture trained in one measured plan is no
    longer copies when the next plan collapses it (this raised before)."""
    from moebsr.planning.plan import plan_builder
    build = plan_builder(tiny_moevit(TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2)), "fp32", True, False)
    model = build(units_plan([(1, "mlp")]))
    with torch.no_grad():
        model.blocks[1].mlp.experts.fc1_weight[0].add_(1.0)  # what an optimizer step does to the trained experts
    assert build(units_plan([(3, "attn")])).moe_blocks == ()
    assert build(units_plan([(1, "mlp")])).moe_blocks == (1,)


def test_scores_with_bf16_frozen_weights_and_collapsed_mixtures_match_the_fp32_ones():
    """The low-memory scoring pass (what a tight budget gets): frozen weights in bf16, every mixture its dense MLP,
    only a stem table on the autograd path. Its scores are the fp32 pass's within bf16 rounding, and it holds less."""
    from moebsr.model.frozen_experts import collapse_frozen_experts
    from moebsr.model.frozen_storage import store_frozen_weights
    model = tiny_moevit(TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2),
                        token_drop=dict(blocks=[2], keep_rate=0.5))
    units = plan_units(model)
    batch = {"a": [images(4, seed=1)], "b": [images(4, seed=2)]}
    labels = {"a": [torch.tensor([1, 2, 3, 4])], "b": [torch.tensor([0, 1, 2, 0])]}
    exact = fisher_potential(model, batch, labels, units, micro_batch=4)
    model.apply_bsr(BSRPlan(preset="none").resolve(4))
    collapse_frozen_experts(model)
    store_frozen_weights(model, "bf16")
    stem = [model.backbone.patch_embed.proj.weight]  # what importance_for opens the path with
    low = fisher_potential(model, batch, labels, plan_units(model), micro_batch=4, on_path=stem)
    assert not stem[0].requires_grad and all(p.grad is None for p in model.parameters())
    for unit, score in low.scores.items():
        assert score == pytest.approx(exact.scores[unit], rel=0.02, abs=1e-4), unit
    assert low.peak_bytes < 0.5 * exact.peak_bytes
    with pytest.raises(RuntimeError, match="no unit's output is on the autograd path"):
        fisher_potential(model, batch, labels, plan_units(model), micro_batch=4, on_path=[])


def _plan_cli(tmp_path, *args, overrides=()):
    return subprocess.run([sys.executable, "-m", "moebsr", "plan", "--config", "configs/quickstart.yaml",
                           "train.batch_size=8", *overrides, "--batches", "1", *args,
                           "--out", str(tmp_path / "p.yaml")],
                          cwd=ROOT, capture_output=True, text=True)


def test_plan_writes_a_config_that_trains_the_plan_and_costs_what_it_predicted(tmp_path):
    from moebsr.analysis.profiling import profile_config
    from moebsr.config import load_config
    done = _plan_cli(tmp_path, "--budget", "memory=0.35x")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "p.plan.json").read_text())
    assert (tmp_path / "p.frontier.png").stat().st_size > 1000
    assert report["predicted"]["memory_ratio"] <= 0.35 and report["score"] > 0
    # the planning pass (measured: weights held, one pass's saved tensors) fits the budget it planned for
    assert 0 < report["planning_memory_bytes"] <= report["budget_value"] and report["planning_fits_budget"]
    assert set(report["presets"]) == {"paper", "last_k", "none"} and len(report["frontier"]) >= 3
    written = (tmp_path / "p.yaml").read_text()
    assert "formula_vit_6x128_28px.safetensors" in written and "checkpoint: /" not in written  # relative to the file
    config = load_config(tmp_path / "p.yaml")
    resolved = config.bsr.plan().resolve(6)
    planned = {(block, sublayer) for block in range(6) for sublayer in resolved.sublayers_of(block)}
    units = {tuple(unit) for unit in report["units"]}
    assert planned == units
    measured = profile_config(config, steps=1, warmup=1)
    batch = measured["batch_size"]
    predicted = report["predicted"]
    assert predicted["memory_bytes"] == pytest.approx(measured["train_memory_bytes"], rel=0.10)
    assert predicted["saved_bytes"] == pytest.approx(measured["saved_activation_bytes_per_image"] * batch, rel=0.10)
    assert predicted["flops"] == pytest.approx(measured["train_flops_per_image"] * batch, rel=0.10)
    assert predicted["trainable_params"] == measured["trainable_params"]
    first = min(block for block, _ in units)
    assert f"blocks {first}: {'+'.join(sorted(s for b, s in units if b == first))}" in measured["recipe"]
    # --levers auto (the default) measured the config as given and the setting that costs least for every plan
    # (recomputed experts, bf16 frozen weights, collapsed frozen mixtures), kept the better plan, and set back the
    # levers that change nothing for it; here it collapses the frozen mixtures (the profile above covers that)
    options = report["lever_options"]
    assert len(options) == 2 and report["score"] == max(option["score"] for option in options)
    assert sorted(tuple(option["levers"].values())[:3] for option in options) == [(False, "fp32", False),
                                                                                  (True, "bf16", True)]
    assert all(tuple(option["levers"].values())[3:] == (8, 1) for option in options)  # no micro-batches unasked
    levers = (config.moe.recompute_experts, config.bsr.frozen_dtype, config.moe.collapse_frozen)
    assert levers == tuple(report["levers"].values())[:3] and config.moe.collapse_frozen
    as_given = next(option for option in options if tuple(option["levers"].values())[:3] == (False, "fp32", False))
    assert report["score"] > as_given["score"]  # the levers buy importance at the same memory
    assert ("set back: no change for this plan" in done.stdout) == bool(report["levers_set_back"])
    for key in ("moe.recompute_experts", "bsr.frozen_dtype"):  # each lever kept costs memory set back, each set back
        section, name = key.split(".")                         # none
        back = copy.deepcopy(config)
        setattr(getattr(back, section), name, {"moe.recompute_experts": False, "bsr.frozen_dtype": "fp32"}[key])
        if back == config:
            continue
        memory = profile_config(back, steps=1, warmup=1)["train_memory_bytes"]
        assert (memory == measured["train_memory_bytes"]) == (key in report["levers_set_back"]), key
        assert memory >= measured["train_memory_bytes"], key


@pytest.fixture(scope="module")
def every_lever_setting():
    """The cost model of every memory-lever setting ``--levers auto`` could choose, on a 3-block quickstart model under
    bf16 autocast (where cast copies of weights are saved too)."""
    from moebsr.config import load_config
    from moebsr.planning.plan import cost_model_for, lever_variants, levers_of
    config = load_config(ROOT / "configs" / "quickstart.yaml", ["train.batch_size=4", "train.mixed_precision=bf16",
                                                                "model.depth=3", "moe.num_experts=4"])
    settings = [config, *lever_variants(config, True)]
    return config, {tuple(levers_of(variant).values()): cost_model_for(variant, {"mnist": 10}, ["mnist"])
                    for variant in settings}


@pytest.mark.parametrize("kind", ["memory", "flops"])
def test_the_cheapest_lever_setting_costs_no_more_than_any_other_for_every_plan(every_lever_setting, kind):
    """For memory and FLOPs budgets --levers auto measures only the config as given and :func:`cheapest_levers`: exact
    only if no other setting makes any plan cheaper. Checked against every setting, every plan of one or two units
    (with collapsed mixtures an MoE block's mlp unit trains its router too, so plans train both or neither)."""
    from moebsr.planning.plan import cheapest_levers, levers_of
    config, costs = every_lever_setting
    cheapest = cheapest_levers(config, True, kind)
    cheapest_costs = costs[tuple(levers_of(cheapest).values())]
    assert cheapest.moe.collapse_frozen and cheapest.moe.recompute_experts == (kind == "memory")
    units = [unit for unit in cheapest_costs.units if unit[1] != "router"]
    moe_blocks = {block for other in costs.values() for block, sublayer in other.units if sublayer == "router"}
    assert moe_blocks  # (a collapsed model's frozen mixtures are dense MLPs: its units list no router)
    compared = 0
    for plan in [(unit,) for unit in units] + list(itertools.combinations(units, 2)):
        with_routers = tuple(sorted(plan + tuple((block, "router") for block, sublayer in plan
                                                 if sublayer == "mlp" and block in moe_blocks)))
        for setting, other in costs.items():
            as_set = plan if setting[2] else with_routers  # setting[2]: moe.collapse_frozen
            assert cheapest_costs.predict(plan).value(kind) <= other.predict(as_set).value(kind), (setting, plan)
            compared += 1
    assert compared > 100


def test_a_tight_budget_scores_in_low_precision_and_the_planning_pass_fits_it(tmp_path):
    """At 0.1x of full fine-tuning the fp32 weights alone would not leave room to score: the pass scores with frozen
    weights in bf16 and the mixtures collapsed, at the largest micro-batch that fits, and holds less than the budget."""
    done = _plan_cli(tmp_path, "--budget", "memory=0.1x", "--levers", "config",
                     overrides=["moe.collapse_frozen=true", "bsr.frozen_dtype=bf16"])
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "p.plan.json").read_text())
    memory = report["planning_memory"]
    assert memory["scoring_low_precision"] and 0 < memory["scoring"] <= report["budget_value"]
    assert 0 < memory["measuring"] <= report["budget_value"] and report["planning_fits_budget"]
    assert all(candidate["score"] == 0 for candidate in report["candidates"] if candidate["unit"][1] == "router")
    assert report["predicted"]["memory_bytes"] <= report["budget_value"]


def test_the_scoring_micro_batch_is_sized_on_what_scoring_itself_saves_per_image(tmp_path):
    """Training in bf16 autocast saves less per image than scoring (fp32, the whole trunk on the autograd path):
    a micro-batch sized from training's step held 22.75 MiB against this 22.42 MiB budget. It is sized on a probe of
    the scoring model (with one task's images loaded at a time), and measuring, which counts without keeping, holds
    far less."""
    done = _plan_cli(tmp_path, "--budget", "memory=0.25x", "--levers", "config",
                     overrides=["train.batch_size=32", "train.mixed_precision=bf16"])
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "p.plan.json").read_text())
    memory, budget = report["planning_memory"], report["budget_value"]
    assert not memory["scoring_low_precision"] and 0.9 * budget < memory["scoring"] <= budget
    assert report["importance_micro_batch"] < 32 and 0 < memory["measuring"] < 0.5 * budget


def test_accumulate_splits_the_batch_into_micro_batches_where_it_buys_importance(tmp_path):
    """``--accumulate``: the best lever setting is measured again with its batch in 2 and 4 micro-batches (their
    gradients accumulated: the same 8 images per step). At 0.2x a step of 2 images leaves room for more units; the
    written config trains that way and costs what was predicted."""
    from moebsr.analysis.profiling import profile_config
    from moebsr.config import load_config
    done = _plan_cli(tmp_path, "--budget", "memory=0.2x", "--accumulate")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "p.plan.json").read_text())
    whole_batch = max(option["score"] for option in report["lever_options"]
                      if option["levers"]["train.batch_size"] == 8)
    assert report["levers"]["train.batch_size"] * report["levers"]["train.grad_accum_steps"] == 8
    assert report["levers"]["train.grad_accum_steps"] > 1 and report["score"] > whole_batch
    config = load_config(tmp_path / "p.yaml")
    assert (config.train.batch_size, config.train.grad_accum_steps) == (report["levers"]["train.batch_size"],
                                                                        report["levers"]["train.grad_accum_steps"])
    measured = profile_config(config, steps=1, warmup=1)
    assert report["predicted"]["memory_bytes"] == pytest.approx(measured["train_memory_bytes"], rel=0.10)
    assert report["predicted"]["memory_bytes"] <= report["budget_value"]


def test_an_unreachable_budget_is_one_line_naming_the_cheapest_plan_and_writes_nothing(tmp_path):
    done = _plan_cli(tmp_path, "--budget", "memory=1MiB", "--levers", "config")
    assert done.returncode == 2
    assert done.stderr.startswith("error: --budget: memory=1MiB (1.00 MiB) is below the cheapest plan, heads only: ")
    assert done.stderr.count("\n") == 1 and not list(tmp_path.iterdir())


def test_block_sublayers_trains_exactly_the_named_sub_layers_of_each_block():
    model = tiny_moevit(TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2),
                        bsr=dict(preset="custom", trainable_blocks=[2], block_sublayers={1: ["router"], 3: ["attn"]}))
    trainable_blocks = {int(name.split(".")[2]) for name, p in model.named_parameters()
                        if p.requires_grad and name.startswith("backbone.blocks.")}
    assert trainable_blocks == {1, 2, 3}
    router_only = [name for name, p in model.named_parameters() if p.requires_grad and ".blocks.1." in name]
    assert router_only and all(".router." in name for name in router_only)
    attention_only = [name for name, p in model.named_parameters() if p.requires_grad and ".blocks.3." in name]
    assert attention_only and all(".attn." in name for name in attention_only)
    with pytest.raises(ValueError, match=r"^bsr.block_sublayers.3: \['mlps'\] is invalid; accepted: a non-empty list"):
        BSRPlan(preset="none", block_sublayers={3: ["mlps"]}).resolve(4)
    with pytest.raises(ValueError, match=r"^bsr.block_sublayers"):
        BSRPlan(preset="none", block_sublayers={9: ["mlp"]}).resolve(4)


def test_the_step_time_fit_recovers_a_linear_cost_and_predicts_from_composed_flops_and_parameters(tiny):
    from moebsr.planning.costs import fit_step_time
    generator = torch.Generator().manual_seed(0)
    timings = [(float(f), int(p), 2e-9 * float(f) + 3e-7 * int(p) + 0.004)
               for f, p in zip(torch.randint(10 ** 8, 10 ** 9, (20,), generator=generator),
                               torch.randint(10 ** 4, 10 ** 6, (20,), generator=generator))]
    (per_flop, per_param, fixed), error = fit_step_time(timings)
    assert (per_flop, per_param, fixed) == (pytest.approx(2e-9), pytest.approx(3e-7), pytest.approx(0.004))
    assert error < 1e-9
    _, _, costs = tiny
    costs.step_fit = (per_flop, per_param, fixed)
    try:
        plan = costs.predict([(2, "attn"), (3, "mlp")])
        assert plan.step_seconds == pytest.approx(2e-9 * plan.flops + 3e-7 * plan.trainable_params + 0.004)
        budget = costs.predict([(3, "mlp")]).step_seconds * 1.01
        choice = best_plan(costs, {unit: 1.0 for unit in costs.units}, "step", budget)
        assert choice.units and choice.cost.step_seconds <= budget
    finally:
        costs.step_fit = None


def test_measure_is_a_value():
    assert Measure(1, 2, 3, 4) + Measure(1, 1, 1, 1) - Measure(2, 3, 4, 5) == Measure(0, 0, 0, 0)


def test_unit_parameter_counts_on_an_eva_whose_layer_scales_are_bare_parameters_or_absent():
    """EVA blocks name their layer scales as bare parameters (gamma_1/gamma_2) or None: counting a unit's parameters
    through .parameters() of each sub-layer module crashed moebsr plan on every EVA model."""
    from test_model_eva import moe_from, tiny_eva

    from moebsr.planning.costs import unit_parameter_counts
    for variant in ("eva02_tiny", "eva02_tiny_layer_scale"):
        model = moe_from(tiny_eva(variant))
        model.apply_bsr(units_plan([]))  # heads and final norm
        base = sum(p.numel() for p in model.parameters() if p.requires_grad)
        counts = unit_parameter_counts(model, plan_units(model))
        for unit, count in counts.items():
            model.apply_bsr(units_plan([unit]))
            assert count == sum(p.numel() for p in model.parameters() if p.requires_grad) - base, (variant, unit)
