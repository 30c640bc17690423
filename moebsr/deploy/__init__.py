"""Deploying one task of a multitask run: extraction, expert pruning, the task folder, ONNX, prediction.

``moebsr export`` (:func:`export_task`) and ``moebsr predict`` (:func:`predict`) are the commands; the pieces they
use (:func:`extract_task`, :func:`measure_routing_mass`, :func:`prune_experts`, :func:`heal`, :func:`export_onnx`)
work on any :class:`moebsr.model.MoEViT`.
"""

from ..model.prune import choose_experts, choose_layer_experts, measure_routing_mass, prune_experts
from .bundle import ExportError
from .exporter import export_task, format_report
from .extract import extract_task, merge_lora
from .heal import heal, heal_task_model
from .onnx_export import check_onnx, export_onnx

__all__ = ["ExportError", "check_onnx", "choose_experts", "choose_layer_experts", "export_onnx", "export_task",
           "extract_task", "format_report", "heal", "heal_task_model", "measure_routing_mass", "merge_lora",
           "prune_experts"]
