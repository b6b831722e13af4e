"""Compare tuning methods at equal sample budget: `rlhpo compare`.

- :mod:`~rlhpo.compare.methods`: method strings and running one cell;
- :mod:`~rlhpo.compare.runner`: cells in parallel, resumable, results files;
- :mod:`~rlhpo.compare.stats`: IQM, stratified bootstrap CIs, probability of improvement, ranks;
- :mod:`~rlhpo.compare.report`, :mod:`~rlhpo.compare.plots`: summary.md and PNGs.
"""

from rlhpo.compare.methods import STARTS, MethodError, MethodSpec, parse_method, parse_methods
from rlhpo.compare.runner import CompareConfig, CompareError, CompareResult, run_comparison

__all__ = [
    "STARTS",
    "CompareConfig",
    "CompareError",
    "CompareResult",
    "MethodError",
    "MethodSpec",
    "parse_method",
    "parse_methods",
    "run_comparison",
]
