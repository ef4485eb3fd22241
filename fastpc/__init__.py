"""fastpc: fast and deep predictive coding networks.

One model (:class:`PCNet`), many interchangeable learners (``make_learner``), the same energy
functions for all of them.
"""

from . import energy, init_latent, optim  # init_latent registers the inits memory and amortized
from .blocks import BlockOps, block_ops, preactivation_split
from .errors import UserError
from .init import StateInit, init_options, list_inits, make_init, register_init
from .learners import (
    Equilibrium,
    Learner,
    StepResult,
    learner_options,
    list_learners,
    make_learner,
    register_learner,
)
from .nets import PCNet, mlp, resnet, vgg

__version__ = "0.1.0"

__all__ = [
    "PCNet",
    "mlp",
    "vgg",
    "resnet",
    "energy",
    "optim",
    "BlockOps",
    "block_ops",
    "preactivation_split",
    "Learner",
    "Equilibrium",
    "StepResult",
    "make_learner",
    "list_learners",
    "learner_options",
    "register_learner",
    "StateInit",
    "make_init",
    "list_inits",
    "init_options",
    "register_init",
    "UserError",
]
