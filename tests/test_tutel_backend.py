"""``moe.backend: tutel`` in one process: same weights give the torch backend's outputs, losses and gradients, and
state dicts move between the backends. Skipped when tutel is not installed (it is not on PyPI; see
docs/expert-parallel.md)."""

import sys

import pytest
import torch
from tiny_models import distinct_experts, images, tiny_moevit

from moebsr.config import ConfigError, RunConfig, validate_against_model
from moebsr.errors import is_user_error

NO_TUTEL = "tutel is not installed (not on PyPI): see docs/expert-parallel.md"
TASKS = {"a": 10, "b": 3}
CASES = {
    "top2-renormalised": dict(moe=dict(num_experts=4, top_k=2)),
    "top2-raw-probabilities": dict(moe=dict(num_experts=4, top_k=2, renormalize=False)),
    "top1-renormalised": dict(moe=dict(num_experts=4, top_k=1)),
    "top4-token-drop": dict(moe=dict(num_experts=4, top_k=4), token_drop=dict(keep_rate=0.5)),
    "shared-router": dict(moe=dict(num_experts=4, top_k=2, router="shared")),
    "capacity-1.25": dict(moe=dict(num_experts=4, top_k=2, capacity_factor=1.25)),
}


def _pair(case: dict):
    """A torch-backend model with distinct experts and gates, and a tutel-backend one with its weights."""
    reference = distinct_experts(tiny_moevit(TASKS, bsr="all", **case))
    tutel_case = {**case, "moe": {**case["moe"], "backend": "tutel"}}
    candidate = tiny_moevit(TASKS, bsr="all", **tutel_case)
    candidate.load_state_dict(reference.state_dict())
    return reference, candidate


@pytest.mark.parametrize("name", list(CASES))
def test_same_weights_give_the_same_outputs_loss_and_gradients(name):
    pytest.importorskip("tutel", reason=NO_TUTEL)
    reference, candidate = _pair(CASES[name])
    x = images(4)
    losses = []
    for model in (reference, candidate):
        outputs = model(x, list(TASKS))
        loss = sum(out.pow(2).mean() for out in outputs.values()) + model.aux_loss()
        loss.backward()
        losses.append((outputs, model.aux_loss().detach(), loss.detach()))
    (out_ref, aux_ref, loss_ref), (out_tut, aux_tut, loss_tut) = losses
    for task in TASKS:
        assert (out_ref[task] - out_tut[task]).abs().max().item() <= 1e-5
    assert aux_ref.item() > 0 and abs(aux_ref.item() - aux_tut.item()) <= 1e-6
    assert abs(loss_ref.item() - loss_tut.item()) <= 1e-5
    grads_ref = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    grads_tut = {n: p.grad for n, p in candidate.named_parameters() if p.grad is not None}
    assert grads_ref.keys() == grads_tut.keys() and any(".experts." in n for n in grads_ref)
    scale = max(g.abs().max().item() for g in grads_ref.values())
    worst = max((grads_ref[n] - grads_tut[n]).abs().max().item() for n in grads_ref)
    assert worst <= 1e-5 * scale, f"gradients differ by {worst:.2e} (largest gradient {scale:.2f})"


def test_tutel_layer_really_dispatches_through_tutel(monkeypatch):
    pytest.importorskip("tutel", reason=NO_TUTEL)
    from tutel.impls import moe_layer

    _, candidate = _pair(CASES["top2-renormalised"])
    calls = []
    original = moe_layer.MOELayer.forward
    monkeypatch.setattr(moe_layer.MOELayer, "forward", lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    candidate(images(2), list(TASKS))
    # one call per MoE block per task, each with its task's gate
    assert [call["gate_index"] for call in calls] == [0, 1] * len(candidate.moe_blocks)


def test_state_dicts_move_between_backends_both_ways(tmp_path):
    pytest.importorskip("tutel", reason=NO_TUTEL)
    from safetensors.torch import save_file

    from moebsr.training.export import load_weights

    reference, candidate = _pair(CASES["top2-raw-probabilities"])
    assert list(reference.state_dict()) == list(candidate.state_dict())
    x = images(3, seed=7)
    with torch.no_grad():
        expected = reference(x, list(TASKS))
    # tutel -> torch through a safetensors file, as an exported run would be loaded
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in candidate.state_dict().items()}, str(path))
    fresh_torch = tiny_moevit(TASKS, seed=3, moe=dict(num_experts=4, top_k=2, renormalize=False))
    load_weights(fresh_torch, path)
    fresh_tutel = tiny_moevit(TASKS, seed=4, moe=dict(num_experts=4, top_k=2, renormalize=False, backend="tutel"))
    fresh_tutel.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for model in (fresh_torch, fresh_tutel):
            outputs = model(x, list(TASKS))
            assert all((outputs[t] - expected[t]).abs().max().item() <= 1e-5 for t in TASKS)


def test_building_a_tutel_model_draws_the_same_random_numbers_as_torch():
    pytest.importorskip("tutel", reason=NO_TUTEL)
    built = []
    for backend in ("torch", "tutel"):  # tutel initialises gates of its own; they must not shift the seed
        model = tiny_moevit(TASKS, moe=dict(num_experts=4, top_k=2, backend=backend))
        built.append((model.state_dict(), torch.rand(3)))
    (state_torch, next_torch), (state_tutel, next_tutel) = built
    assert all(torch.equal(value, state_tutel[key]) for key, value in state_torch.items())
    assert torch.equal(next_torch, next_tutel)


def test_selecting_tutel_without_it_installed_is_one_clear_line(monkeypatch):
    for module in [m for m in sys.modules if m == "tutel" or m.startswith("tutel.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "tutel", None)  # makes `import tutel` fail as if it were absent
    with pytest.raises(ValueError) as error:
        tiny_moevit(TASKS, moe=dict(num_experts=4, top_k=2, backend="tutel"))
    message = str(error.value)
    assert "\n" not in message and "moe.backend: 'tutel'" in message and "accepted: torch" in message
    assert "pip install" in message and "microsoft/tutel" in message
    assert is_user_error(error.value)  # the CLIs print it as one line and exit 2, no stack trace
    config = RunConfig()
    config.moe.backend = "tutel"
    with pytest.raises(ConfigError, match="moe.backend: 'tutel' is selected but tutel cannot be imported"):
        validate_against_model(config, depth=12)
