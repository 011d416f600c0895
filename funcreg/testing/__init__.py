"""Testing helpers for funcreg and for code built on it: Hypothesis strategies over parameter trees,
and property checks for penalties (``check_penalty``, ``check_forms_agree``).

The checks are sound at kinks of non-smooth penalties (a gradient difference passes only where the
closed form lies between the one-sided partial derivatives; the forms step from a common point each
step), build their Hypothesis settings on top of the loaded profile, and take ``seed=`` to replay a
search. Needs ``hypothesis`` (``pip install -e ".[test]"``).
"""

from funcreg.testing.checks import check_forms_agree
from funcreg.testing.checks import check_penalty
from funcreg.testing.strategies import DTYPES
from funcreg.testing.strategies import gradient_sequences
from funcreg.testing.strategies import gradients_like
from funcreg.testing.strategies import like
from funcreg.testing.strategies import param_trees
from funcreg.testing.strategies import tensors

__all__ = [
    "DTYPES",
    "check_forms_agree",
    "check_penalty",
    "gradient_sequences",
    "gradients_like",
    "like",
    "param_trees",
    "tensors",
]
