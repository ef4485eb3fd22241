"""Learning algorithms behind a registry: ``make_learner(name, net, **options)``."""

from __future__ import annotations

from .base import Equilibrium, Learner, StepResult
from .registry import learner_class, learner_options, list_learners, make_learner, register_learner

__all__ = ["Learner", "Equilibrium", "StepResult", "register_learner", "make_learner", "list_learners",
           "learner_class", "learner_options"]

# register the built-in learners (import order = list order)
from . import bp as _bp  # noqa: E402,F401
from . import spc as _spc  # noqa: E402,F401
from . import epc as _epc  # noqa: E402,F401
from . import ep as _ep  # noqa: E402,F401
