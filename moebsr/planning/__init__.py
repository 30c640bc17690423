"""Train to a budget: measured costs, data-driven importance and an exact search over which sub-layers train."""

from .budget import BUDGET_KINDS, Budget, PlanError, parse_budget
from .costs import CostModel, PlanCost, plan_units, units_plan
from .search import best_plan, frontier

__all__ = ["BUDGET_KINDS", "Budget", "CostModel", "PlanError", "PlanCost", "best_plan", "frontier", "parse_budget",
           "plan_units", "units_plan"]
