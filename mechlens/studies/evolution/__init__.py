"""Deep Self-Evolving Reasoning: iterated verify-and-refine chains and their Markov-chain
diagnostic (seed 004; the paper gives no code).

- `transitions`: p_up, p_down and the stationary accuracy of correctness chains
  (`transition_estimates`), majority votes;
- `chains`: the chains themselves (`evolve` -> `Chains`).

Example:
    >>> from mechlens.studies import evolution
    >>> evolution.transition_estimates([[0, 1], [1, 1]]).p_up[0]
    1.0
"""

from mechlens.studies.evolution.chains import EVOLVE_SAMPLING, REFINE, Chains, evolve
from mechlens.studies.evolution.transitions import Transitions, majority_vote, transition_estimates

__all__ = [
    "EVOLVE_SAMPLING",
    "REFINE",
    "Chains",
    "Transitions",
    "evolve",
    "majority_vote",
    "transition_estimates",
]
