"""State initializers: the registry, options from make_learner, what they see (labels and
converged states), and their state in checkpoints and through ``Learner.to``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.testing import assert_close

import fastpc as fpc
from fastpc.init import StateInit, init_options, register_init
from numerics import two_path_tol

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


# ---- previous and class_average (PAPERS.md §3) ---------------------------------------------------
def _toy_states(seed, B=6, widths=(4, 3)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, w, generator=g, dtype=DT) for w in widths]


def test_class_average_is_the_closed_form_running_average():
    """A toy sequence of batches with known converged states: warm-up is the plain mean of
    every sample observed, then one exponential step per batch with the batch's class mean."""
    mom, warmup = 0.75, 3
    from fastpc.init import make_init
    init = make_init("class_average", momentum=mom, warmup=warmup)
    x = torch.zeros(6, 2, dtype=DT)
    ys = [torch.tensor([0, 0, 2, 2, 2, 0]), torch.tensor([0, 2, 2, 2, 2, 2]), torch.tensor([0, 0, 0, 0, 0, 0])]
    batches = [_toy_states(k) for k in range(3)]
    expect = {c: [None, None] for c in (0, 2)}
    seen = {0: 0, 2: 0}
    for y, states in zip(ys, batches):
        init.observe(x, y, states)
        for c in (0, 2):
            k = int((y == c).sum())
            if k == 0:
                continue
            for i, s in enumerate(states):
                m = s[y == c].mean(0)
                a = expect[c][i]
                if seen[c] < warmup or seen[c] == 0:  # plain mean of every sample so far
                    expect[c][i] = m if a is None else (seen[c] * a + k * m) / (seen[c] + k)
                else:
                    expect[c][i] = mom * a + (1 - mom) * m
            seen[c] += k
    # by hand, class 0 on layer 0: batch 1 has 3 samples (warm-up: their mean); 3 seen = warmup,
    # so batches 2 and 3 are exponential steps with their class means
    s0, s1, s2 = (b[0] for b in batches)
    m1 = s0[[0, 1, 5]].mean(0)
    m2 = s1[[0]].mean(0)
    m3 = s2.mean(0)
    assert_close(expect[0][0], mom * (mom * m1 + (1 - mom) * m2) + (1 - mom) * m3, rtol=0, atol=1e-14)
    ff = [torch.full((3, w), 7.0, dtype=DT) for w in (4, 3)]
    got = init(ff, x[:3], torch.tensor([2, 1, 0]))
    for i in range(2):
        assert_close(got[i][0], expect[2][i], rtol=0, atol=1e-14)
        assert_close(got[i][2], expect[0][i], rtol=0, atol=1e-14)
        assert torch.equal(got[i][1], ff[i][1])  # class 1 never observed: the FF state
    assert init.count.tolist() == [10, 0, 8]


def test_class_average_takes_one_hot_targets_and_needs_labels():
    from fastpc.init import make_init
    a, b = make_init("class_average", momentum=0.5), make_init("class_average", momentum=0.5)
    states = _toy_states(1)
    x = torch.zeros(6, 2, dtype=DT)
    y = torch.tensor([1, 3, 3, 0, 1, 1])
    a.observe(x, y, states)
    b.observe(x, torch.nn.functional.one_hot(y, 5).to(DT), states)  # dense targets: argmax
    ff = _toy_states(2)
    for s, t in zip(a(ff, x, y), b(ff, x, torch.nn.functional.one_hot(y, 5).to(DT))):
        assert torch.equal(s, t)
    msg = r"class_average init needs class labels: y as class indices \(B,\) or one-hot/dense targets"
    with pytest.raises(ValueError, match=msg + r".*no labels"):
        a(ff, x, None)
    with pytest.raises(ValueError, match=msg + r".*generative mode"):
        a.observe(None, torch.zeros(6, 5, dtype=DT), states)
    with pytest.raises(ValueError, match=r"class indices \(B,\) or one-hot/dense targets \(B, C\); got"):
        a(ff, x, torch.zeros(6, 2, 2))
    with pytest.raises(ValueError, match=r"momentum in \[0, 1\)"):
        make_init("class_average", momentum=1.0)
    with pytest.raises(ValueError, match="warmup, an integer >= 0"):
        make_init("class_average", warmup=-1)


def test_previous_returns_the_last_converged_states_by_position():
    from fastpc.init import make_init
    init = make_init("previous")
    x = torch.zeros(6, 2, dtype=DT)
    ff = [torch.full((6, w), -1.0, dtype=DT) for w in (4, 3)]
    for s, f in zip(init(ff, x, None), ff):  # nothing observed: the FF state
        assert torch.equal(s, f)
    first, last = _toy_states(1), _toy_states(2)
    init.observe(x, None, first)
    init.observe(x, None, last)
    for s, m in zip(init(ff, x, None), last):
        assert torch.equal(s, m)
    big = [torch.full((8, w), -1.0, dtype=DT) for w in (4, 3)]  # positions 6, 7 were not in the last batch
    for s, m, f in zip(init(big, x, None), last, big):
        assert torch.equal(s[:6], m) and torch.equal(s[6:], f[6:])
    other = [torch.full((6, 5), -1.0, dtype=DT), torch.full((6, 3), -1.0, dtype=DT)]  # layer 0 reshaped
    got = init(other, x, None)
    assert torch.equal(got[0], other[0]) and torch.equal(got[1], last[1])


@pytest.mark.parametrize("name, opts", [("class_average", {"momentum": 0.5, "warmup": 4}), ("previous", {})])
@pytest.mark.parametrize("learner", ["spc", "epc"])
def test_memory_initializers_round_trip_through_learner_checkpoints(name, opts, learner):
    """A fresh learner loading the state_dict starts inference from the same states, and it
    really starts from the initializer's memory (iters=0 returns it)."""
    def make():
        torch.manual_seed(0)
        net = fpc.mlp([6, 8, 8, 3], act="tanh").to(DT)
        return fpc.make_learner(learner, net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), iters=3,
                                init=name, init_options=dict(opts))
    lrn = make()
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        lrn.step(torch.randn(5, 6, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g))
    x, y = torch.randn(5, 6, generator=g, dtype=DT), torch.tensor([0, 1, 2, 1, 0])
    state = copy.deepcopy(lrn.state_dict())
    fresh = make()
    fresh.load_state_dict(state)
    ff, _ = lrn.net.forward_states(x)
    a, b = lrn.init(ff, x, y), fresh.init(ff, x, y)
    for s, t, f in zip(a, b, ff, strict=True):
        assert torch.equal(s, t) and not torch.equal(s, f)
    lrn.iters = fresh.iters = 0
    for s, t in zip(lrn.infer(x, y).states, a, strict=True):  # ePC: s_i = f_i(s_{i-1}) + (s_i - f_i(s_{i-1}))
        assert_close(s, t, **two_path_tol(DT, 2))
    assert fresh.to(torch.float32).init(*(lambda f: (f, x.float(), y))(
        [s.float() for s in ff]))[0].dtype == torch.float32


def test_memory_initializers_skip_the_compiled_step():
    net = fpc.mlp([6, 8, 3])
    assert not fpc.make_learner("spc", net, init="class_average", compile=True).uses_compiled_step
    assert not fpc.make_learner("spc", net, init="previous", compile=True).uses_compiled_step


# ---- SMM accounting (PAPERS.md §0: a PC inference step is 2 SMM, BP 2L − 1) -------------------------
def test_smm_counts_match_hand_counts():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 6, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g)
    for depth in (2, 3, 5):
        net = fpc.mlp([6] + [7] * (depth - 1) + [3]).to(DT)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        assert fpc.make_learner("bp", net, optimizer=opt).step(x, y).smm == 2 * depth - 1
        for T in (0, 1, 4):
            spc = fpc.make_learner("spc", net, optimizer=opt, iters=T)
            epc = fpc.make_learner("epc", net, optimizer=opt, iters=T, safeguard=False)
            assert spc.step(x, y).smm == spc.smm(T) == 2 * T
            assert fpc.make_learner("spc", net, optimizer=opt, iters=T, incremental=True).step(x, y).smm == 2 * T
            # ePC step: the perturbed forward re-runs blocks 2..L, the backward is L - 1 products
            assert epc.step(x, y).smm == epc.smm(T) == 2 * (depth - 1) * T


def _train_cfg(data_root, out, epochs, **extra):
    from tinydata import tiny_overrides

    from fastpc.config import load_config

    return load_config(None, tiny_overrides(data_root, out, **{
        "learner.name": "spc", "learner.init": "class_average", "learner.init_options": "{momentum: 0.5}",
        "data.grouped": 1, "train.epochs": epochs, "learner.compile": False, **extra}))


@pytest.mark.usefixtures("isolated")
@pytest.mark.parametrize("learner, per_step", [("spc", 6), ("bp", 5)])  # spc: 2T, T = 3; bp: 2L - 1, L = 3
def test_fastpc_train_reports_smm_per_step_and_total(data_root, tmp_path, learner, per_step):
    from fastpc.runfiles import read_metrics
    from fastpc.train import fit

    extra = {"learner.name": learner} if learner == "spc" else {
        "learner.name": "bp", "learner.init": "forward", "learner.init_options": "{}"}
    summary = fit(_train_cfg(data_root, tmp_path / "run", 1, **extra))
    (row,) = read_metrics(tmp_path / "run" / "metrics.csv")
    assert row["smm_per_step"] == per_step and row["smm_total"] == per_step * row["step"]
    assert summary.smm_per_step == per_step and summary.smm_total == per_step * row["step"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["smm_total"] == summary.smm_total and on_disk["train_seconds"] > 0


@pytest.mark.slow
@pytest.mark.usefixtures("isolated")
def test_fastpc_train_resumes_class_average_exactly(data_root, tmp_path):
    """``fastpc train`` with class_average on label-grouped batches: SMM per step (2T for spc)
    and in total in metrics.csv and summary.json; a run stopped after epoch 1 and resumed ends
    with the weights, class averages and SMM total of an uninterrupted run (the averages travel
    in the checkpoint)."""
    from fastpc.runfiles import read_metrics
    from fastpc.train import CHECKPOINT, fit, load_checkpoint

    def cfg(out, epochs):
        return _train_cfg(data_root, out, epochs)

    whole = fit(cfg(tmp_path / "whole", 2))
    rows = read_metrics(tmp_path / "whole" / "metrics.csv")
    per_epoch = int(rows[0]["step"])
    assert [r["smm_per_step"] for r in rows] == [6.0, 6.0]  # iters 3
    assert [r["smm_total"] for r in rows] == [6.0 * per_epoch, 12.0 * per_epoch]
    assert whole.smm_per_step == 6 and whole.smm_total == 12 * per_epoch and whole.train_seconds > 0
    fit(cfg(tmp_path / "part", 1))
    resumed = fit(cfg(tmp_path / "part", 2), resume=True)
    assert resumed.smm_total == whole.smm_total
    a = load_checkpoint(tmp_path / "whole" / CHECKPOINT)["learner"]
    b = load_checkpoint(tmp_path / "part" / CHECKPOINT)["learner"]
    assert a["init"].keys() == b["init"].keys() and "mem_0" in a["init"] and int(a["init"]["count"].sum()) > 0
    for part in ("net", "init"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
