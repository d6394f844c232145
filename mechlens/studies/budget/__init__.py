"""Sequential vs parallel reasoning at a fixed token budget ("To Backtrack or Not to Backtrack",
seed 003; the paper gives no code): the token accounting (`harness`) and the compute-matched
curve of one model (`curve`).

Example:
    >>> from mechlens.studies import budget
    >>> budget.parallel_used([budget.Sample(30, "1"), budget.Sample(30, "1")], 50)
    1
"""

from mechlens.studies.budget.curve import BUDGET_SAMPLING, BudgetCurve, budget_curve
from mechlens.studies.budget.harness import Sample, answers_at, parallel_right, parallel_used

__all__ = [
    "BUDGET_SAMPLING",
    "BudgetCurve",
    "Sample",
    "answers_at",
    "budget_curve",
    "parallel_right",
    "parallel_used",
]
