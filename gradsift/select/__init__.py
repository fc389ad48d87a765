"""Selection methods: Filter-then-Weight, its ablations and the baselines, behind one interface.

``get_selector(name, **options)`` builds a registered method; ``available_selectors()`` lists
them. ``filter_then_weight(b, K, k)`` is the bare algorithm on an alignment vector and an
interaction matrix; ``alignment_ratio`` evaluates ``ρ = bᵀw / √(wᵀKw)`` of any selection.
Importing this package registers every built-in method (``baselines``, ``ftw_selector``).
"""

from gradsift.select import baselines, ftw_selector  # noqa: F401  (registers the methods)
from gradsift.select.base import (
    Selection,
    SelectionContext,
    Selector,
    SelectorConfig,
    available_selectors,
    get_selector,
    register_selector,
)
from gradsift.select.ftw import alignment_ratio, filter_then_weight, ftw_solve

__all__ = [
    "Selection",
    "SelectionContext",
    "Selector",
    "SelectorConfig",
    "alignment_ratio",
    "available_selectors",
    "filter_then_weight",
    "ftw_solve",
    "get_selector",
    "register_selector",
]
