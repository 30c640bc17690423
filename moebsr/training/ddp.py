"""Whether DDP must look for unused parameters: decided once, before ``prepare``, from the model and the task sets
the sampler can draw.

``find_unused_parameters=True`` makes DDP walk the autograd graph of every step to mark the parameters the step did
not reach (a cost per step, and a warning when there were none); without it, a step that leaves a trained parameter
out stops the next step with "Expected to have finished reduction". A step leaves out exactly the parameters of the
tasks it does not train: their heads, their gates (``moe.router: task``) and their task adapters, each held in a
``ModuleDict``/``ParameterDict`` keyed by the model's tasks. Everything else that trains is on every step's path:
the experts are stacked tensors that get a gradient when any expert receives a token, and with a capacity factor of
1 or more the first choice of the first token always fits. A factor below 1 can leave a layer no slot at all, so it
asks for the search too. Making every step touch every parameter instead (a zero-weighted term) would hand AdamW
zero gradients it never sees in one process, whose weight decay and moments would then move those tasks' weights.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from ..model import MoEMlp


def task_parameters(model: nn.Module, tasks: Sequence[str]) -> dict[str, list[str]]:
    """Names of each task's own parameters: those under a ``ModuleDict`` or ``ParameterDict`` keyed by ``tasks``."""
    owned: dict[str, list[str]] = {task: [] for task in tasks}
    containers = [name for name, module in model.named_modules()
                  if isinstance(module, (nn.ModuleDict, nn.ParameterDict)) and set(module.keys()) == set(tasks)]
    for name, _ in model.named_parameters():
        for container in containers:
            prefix = f"{container}." if container else ""
            if name.startswith(prefix):
                task = name[len(prefix):].split(".", 1)[0]
                owned[task].append(name)
                break
    return owned


def unused_parameters_reason(model: nn.Module, tasks: Sequence[str], step_task_sets: Sequence[Sequence[str]],
                             ignored: Sequence[str] = ()) -> Optional[str]:
    """Why some step can leave a trained parameter without a gradient, or ``None`` when every step reaches all of them.

    Args:
        model: The unwrapped model, BSR applied (frozen parameters are no concern of DDP's).
        tasks: The model's tasks.
        step_task_sets: Every set of tasks one step can train (``TaskSampler.step_task_sets``).
        ignored: Parameters DDP does not reduce (experts sharded over the processes).
    """
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad} - set(ignored)
    owned = task_parameters(model, tasks)
    for step_tasks in step_task_sets:
        left_out = [name for task in tasks if task not in step_tasks for name in owned[task] if name in trained]
        if left_out:
            more = f" and {len(left_out) - 1} more" if len(left_out) > 1 else ""
            return f"a step of {list(step_tasks)} leaves {left_out[0]}{more} without a gradient"
    for name, module in model.named_modules():
        if isinstance(module, MoEMlp) and module.dispatch == "grouped" and module.capacity_factor is not None \
                and module.capacity_factor < 1 and any(p.requires_grad for p in module.experts.parameters()):
            return (f"moe.capacity_factor {module.capacity_factor} < 1 can leave the experts of {name} no token "
                    "in a step")
    return None


def check_every_parameter_reached(model: nn.Module, step_tasks: Sequence[str], ignored: Sequence[str] = ()) -> None:
    """After a step's backward, when DDP was told that no step leaves a parameter out: a trained parameter without a
    gradient is a bug of :func:`unused_parameters_reason`, stopped here before the optimizer applies gradients that
    DDP did not all finish reducing."""
    missing = [name for name, parameter in model.named_parameters()
               if parameter.requires_grad and parameter.grad is None and name not in ignored]
    if missing:
        raise RuntimeError(f"DDP: a step of {list(step_tasks)} left {missing[0]} (and {len(missing) - 1} more) without "
                           "a gradient, but unused_parameters_reason found no step that does; please report it")

