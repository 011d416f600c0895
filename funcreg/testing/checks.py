"""Property checks users can run on their own penalties: gradient, prox and form consistency.

Each check runs a Hypothesis search and raises ``AssertionError`` with the shrunk counterexample
(Hypothesis attaches the drawn parameters to the error) when a property fails.

Kinks. A non-smooth penalty has no gradient at its kinks, so gradients are compared coordinate by
coordinate and a mismatch is excused only where the closed-form value lies between the one-sided
partial derivatives (:mod:`funcreg.testing._kinks`). ``check_forms_agree`` moreover steps every
form from the same parameters each step, so neither rounding nor the optimizer can turn a kink into
a failure (:mod:`funcreg.testing._forms_checks`).

Settings. The checks build their Hypothesis settings at call time on top of the loaded profile
(:mod:`funcreg.testing._search`). Pass ``seed=`` to replay one search; a failure notes the seed it
ran with.

The checks live in topic modules; this module is their stable import path.
"""

from __future__ import annotations

# the private helpers too: code that imported them from here before the split keeps working
from funcreg.testing._forms_checks import _forms_gradient as _forms_gradient
from funcreg.testing._forms_checks import _linear_loss as _linear_loss
from funcreg.testing._forms_checks import check_forms_agree as check_forms_agree
from funcreg.testing._kinks import _assert_grad_matches as _assert_grad_matches
from funcreg.testing._kinks import _assert_trees_close as _assert_trees_close
from funcreg.testing._kinks import _kink_excused as _kink_excused
from funcreg.testing._kinks import _kink_step as _kink_step
from funcreg.testing._kinks import _one_sided_partials as _one_sided_partials
from funcreg.testing._penalty_checks import _objective as _objective
from funcreg.testing._penalty_checks import _prox_objective as _prox_objective
from funcreg.testing._penalty_checks import check_penalty as check_penalty
from funcreg.testing._search import _SUPPRESSED as _SUPPRESSED
from funcreg.testing._search import ParamsLike as ParamsLike
from funcreg.testing._search import _check_seed as _check_seed
from funcreg.testing._search import _generic_trees as _generic_trees
from funcreg.testing._search import _note as _note
from funcreg.testing._search import _params_strategy as _params_strategy
from funcreg.testing._search import _run as _run
from funcreg.testing._search import _settings as _settings

__all__ = ["check_forms_agree", "check_penalty"]
