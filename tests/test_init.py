"""State initializers: the registry, options from make_learner, what they see (labels and
converged states), and their state in checkpoints and through ``Learner.to``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import fastpc as fpc
from fastpc.init import StateInit, init_options, register_init

DT = torch.float64


@register_init("_test_recorder")
class Recorder(StateInit):
    """Starts from the FF state shifted by ``shift``; keeps a count of observed samples (a
    buffer) and records what it is shown."""

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.shift = shift
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))
        self.calls: list = []
        self.observed: list = []

    def options(self):
        return {"shift": self.shift}

    def forward(self, ff_states, x, y):
        self.calls.append(None if y is None else y.clone())
        return [s.detach() + self.shift for s in ff_states]

    def observe(self, x, y, states):
        self.seen += x.shape[0]
        self.observed.append((y.clone(), [s.clone() for s in states]))


def _setup(name="spc", **opts):
    torch.manual_seed(0)
    net = fpc.mlp([6, 8, 8, 3], act="tanh").to(DT)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 6, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    lrn = fpc.make_learner(name, net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                           init="_test_recorder", init_options={"shift": 0.25}, iters=3, **opts)
    return lrn, x, y


def test_registry_and_options():
    assert {"forward", "zeros", "normal"} <= set(fpc.list_inits())
    assert init_options("normal") == ["mean", "std"]
    lrn = fpc.make_learner("spc", fpc.mlp([4, 5, 2]), init="normal", init_options={"std": 0.5})
    assert lrn.init.std == 0.5 and lrn.options()["init_options"] == {"mean": 0.0, "std": 0.5}
    with pytest.raises(ValueError, match=r"state init 'normal' has no option\(s\) \['beta'\]; valid options: \['mean', 'std'\]"):
        fpc.make_learner("spc", fpc.mlp([4, 5, 2]), init="normal", init_options={"beta": 1})
    with pytest.raises(ValueError, match="unknown state init 'nope'"):
        fpc.make_learner("epc", fpc.mlp([4, 5, 2]), init="nope")
    with pytest.raises(TypeError, match="init_options must be a dict"):
        fpc.make_learner("epc", fpc.mlp([4, 5, 2]), init_options=[1])
    with pytest.raises(ValueError, match="normal init needs"):
        fpc.make_learner("epc", fpc.mlp([4, 5, 2]), init="normal", init_options={"std": -1})


@pytest.mark.parametrize("name", ["spc", "epc"])
def test_initializer_sees_labels_and_converged_states(name):
    lrn, x, y = _setup(name)
    result = lrn.step(x, y)
    assert len(lrn.init.calls) == 1 and torch.equal(lrn.init.calls[0], y)
    (y_seen, states), = lrn.init.observed
    assert torch.equal(y_seen, y)
    for a, b in zip(states, result.equilibrium.states, strict=True):
        assert torch.equal(a, b)
    # inference really started from the initializer's states: iters=0 returns them unchanged
    lrn.iters = 0
    eq = lrn.infer(x, y)
    ff, _ = lrn.net.forward_states(x)
    for s, f in zip(eq.states, ff, strict=True):
        assert_close(s, f + 0.25)
    assert len(lrn.init.observed) == 1  # infer does not observe; only a training step does


def test_initializer_state_travels_in_checkpoints_and_to():
    lrn, x, y = _setup("epc")
    lrn.step(x, y)
    lrn.step(x, y)
    state = copy.deepcopy(lrn.state_dict())
    assert state["init"]["seen"] == 10 and state["options"]["init_options"] == {"shift": 0.25}
    other, _, _ = _setup("epc")
    other.load_state_dict(state)
    assert other.init.seen == 10
    assert other.to(torch.float32) is other
    assert other.init.seen.dtype == torch.float32 and next(other.net.parameters()).dtype == torch.float32


def test_initializer_is_an_abstract_module():
    with pytest.raises(TypeError):
        StateInit()  # forward is abstract
    assert isinstance(fpc.make_learner("spc", fpc.mlp([4, 5, 2])).init, torch.nn.Module)
