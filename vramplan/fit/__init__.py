"""`vramplan fit`: search the settings space for the best plan that fits a card.

- `space`: the axes (what may change, best value first), the objective order, `fit_request`
- `walk`: the branch-and-bound walk over them with the analytic estimate, `search()`
- `explain`: when nothing fits, which of the user's constraints make it impossible
- `margin`: the safety margin (the estimator's measured error band, else 3%)
- `emit`: the chosen plan as a diffusers / kohya command line or an accelerate config

No torch: fit runs on the analytic tier only.
"""

from vramplan.fit.margin import DEFAULT_MARGIN, SafetyMargin, safety_margin
from vramplan.fit.walk import Blocker, FitResult, Plan, search
from vramplan.fit.space import Criterion, FitRequest, fit_request, parse_prefer

__all__ = ["Blocker", "Criterion", "DEFAULT_MARGIN", "FitRequest", "FitResult", "Plan", "SafetyMargin",
           "fit_request", "parse_prefer", "safety_margin", "search"]
