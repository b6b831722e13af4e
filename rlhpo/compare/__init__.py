"""Compare tuning methods at equal sample budget: `rlhpo compare`.

- :mod:`~rlhpo.compare.methods`: the :class:`Method` base, the registered methods, method
  strings and running one cell (one module per method family, one ``register`` line each);
- :mod:`~rlhpo.compare.runner`: cells in parallel, resumable, results files;
- :mod:`~rlhpo.compare.stats`: IQM, stratified bootstrap CIs, probability of improvement, ranks;
- :mod:`~rlhpo.compare.report`, :mod:`~rlhpo.compare.plots`: summary.md and PNGs.
"""

from rlhpo.compare.methods import (
    STARTS,
    CellRun,
    Method,
    MethodError,
    MethodSpec,
    MethodText,
    parse_method,
    parse_methods,
    register,
    registered,
)
from rlhpo.compare.runner import CompareConfig, CompareError, CompareResult, run_comparison

__all__ = [
    "STARTS",
    "CellRun",
    "CompareConfig",
    "CompareError",
    "CompareResult",
    "Method",
    "MethodError",
    "MethodSpec",
    "MethodText",
    "parse_method",
    "parse_methods",
    "register",
    "registered",
    "run_comparison",
]
