"""Planning a recipe before compressing: the order of its stages by intensity (Progressive Intensity
Hypothesis, arXiv 2603.18426) and per-component budgets (capability-guided, arXiv 2603.16440;
sensitivity; OWL, arXiv 2310.05175)."""
from .budget import ALLOCATORS, bit_specs, budget_map, budget_specs, plan_bit_specs, plan_budget, replan
from .order import equivalent_bits, order_stages, plan_joint, plan_order

__all__ = ["ALLOCATORS", "bit_specs", "budget_map", "budget_specs", "equivalent_bits", "order_stages", "plan_bit_specs",
           "plan_budget", "plan_joint", "plan_order", "replan"]
