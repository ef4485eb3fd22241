"""Every registered learner against one contract (DESIGN.md), parametrized over the registry."""

from __future__ import annotations

import copy

import pytest
import torch
from numerics import two_path_tol
from torch.testing import assert_close

import fastpc as fpc
from fastpc.learners.descent import Descent, Relaxation, Stack, dot, minimize

LEARNERS = fpc.list_learners()


def _problem(dtype=torch.float32, seed=0, B=32):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 10, generator=g) * 2
    y = torch.randint(0, 4, (B,), generator=g)
    x = centers[y] + 0.3 * torch.randn(B, 10, generator=g)
    return x.to(dtype), y


def _learner(name, net, lr=3e-3, **options):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    if name == "bp":
        options = {}
    else:
        options.setdefault("iters", 5)
        options.setdefault("state_lr", 0.1)
    return fpc.make_learner(name, net, optimizer=opt, **options)


def test_registry_lists_the_core_learners():
    assert {"bp", "spc", "epc"} <= set(LEARNERS)
    with pytest.raises(ValueError, match="unknown learner 'nope'"):
        fpc.make_learner("nope", fpc.mlp([2, 2]))
    with pytest.raises(ValueError, match="has no option"):
        fpc.make_learner("bp", fpc.mlp([2, 2]), iters=3)


@pytest.mark.parametrize("name", LEARNERS)
def test_loss_falls_on_a_tiny_problem(name):
    torch.manual_seed(0)
    net = fpc.mlp([10, 32, 32, 4])
    learner = _learner(name, net)
    x, y = _problem()
    first = torch.nn.functional.cross_entropy(net(x), y).item()
    for _ in range(60):
        result = learner.step(x, y)
    last = torch.nn.functional.cross_entropy(net(x), y).item()
    assert last < 0.5 * first, (first, last)
    assert isinstance(result, fpc.StepResult) and result.output.shape == (32, 4)
    assert result.loss.ndim == 0 and torch.isfinite(result.energy)


@pytest.mark.parametrize("name", LEARNERS)
def test_state_dict_round_trips(name):
    torch.manual_seed(0)
    x, y = _problem()
    a = _learner(name, fpc.mlp([10, 16, 16, 4]))
    for _ in range(3):
        a.step(x, y)
    state = copy.deepcopy(a.state_dict())
    torch.manual_seed(1)
    b = _learner(name, fpc.mlp([10, 16, 16, 4]))
    b.load_state_dict(state)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)
    # identical continuation: the optimizer state came along too
    a.step(x, y)
    b.step(x, y)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)
    assert state["learner"] == name and state["options"] == a.options()


@pytest.mark.parametrize("name", LEARNERS)
def test_fixed_seed_reproduces_bit_for_bit(name):
    def run():
        torch.manual_seed(123)
        net = fpc.mlp([10, 16, 16, 4])
        learner = _learner(name, net)
        x, y = _problem()
        losses = [learner.step(x, y).loss for _ in range(4)]
        return torch.stack(losses), [p.detach().clone() for p in net.parameters()]

    (l1, p1), (l2, p2) = run(), run()
    assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


@pytest.mark.parametrize("name", LEARNERS)
def test_float64_works(name):
    torch.manual_seed(0)
    net = fpc.mlp([10, 16, 16, 4]).double()
    learner = _learner(name, net)
    x, y = _problem(torch.float64)
    result = learner.step(x, y)
    assert result.loss.dtype == torch.float64 and result.output.dtype == torch.float64
    eq = learner.infer(x, y, trace=True)
    assert all(s.dtype == torch.float64 for s in eq.states)
    assert all(g.dtype == torch.float64 for g in learner.grads(x, y).values())


@pytest.mark.parametrize("name", LEARNERS)
@pytest.mark.parametrize(
    "build",
    [
        lambda: fpc.vgg("vgg5", in_channels=1, num_classes=4, image_size=16, width_mult=1 / 32),
        lambda: fpc.resnet("resnet18", in_channels=1, num_classes=4, image_size=8, width_mult=1 / 16),
    ],
    ids=["vgg5", "resnet18"],
)
def test_conv_and_residual_builders_run_forward_and_a_step(name, build):
    torch.manual_seed(0)
    net = build()
    x = torch.randn(4, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    assert net(x).shape == (4, 4)
    # iters ≥ depth: sPC's signal needs one step per block to reach the bottom (§1)
    # ep on residual blocks has no closed-form (mod-PGD) sweep and descends F instead: a unit
    # step, as mod-PGD's, so its nudge is not shrunk by state_lr at every block on the way down
    extra = {"state_lr": 1.0} if name == "ep" else {}
    learner = _learner(name, net, iters=net.depth, **extra)
    grads = learner.grads(x, y)
    assert grads.keys() == dict(net.named_parameters()).keys()
    assert all(g.abs().sum() > 0 for g in grads.values()), "every parameter gets a gradient"
    before = [p.detach().clone() for p in net.blocks[-1].parameters()]
    result = learner.step(x, y)
    assert torch.isfinite(result.loss)
    # (sPC's bottom-block gradients are ~1e-11 here, its signal decay, so only the top is
    # guaranteed to move in float32)
    assert all(not torch.equal(b, p) for b, p in zip(before, net.blocks[-1].parameters()))


@pytest.mark.parametrize("name", ["spc", "epc"])
def test_grads_are_what_step_applies(name):
    torch.manual_seed(0)
    net = fpc.mlp([10, 16, 16, 4]).double()
    x, y = _problem(torch.float64)
    learner = fpc.make_learner(name, net, iters=4, state_lr=0.1,
                               optimizer=torch.optim.SGD(net.parameters(), lr=0.5))
    g = learner.grads(x, y)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    learner.step(x, y)
    for n, p in net.named_parameters():
        assert_close(p.detach(), before[n] - 0.5 * g[n])


def test_two_learners_train_copies_of_one_net_without_changing_structure():
    torch.manual_seed(0)
    net = fpc.mlp([10, 16, 4])
    twin = copy.deepcopy(net)
    structure = str(net)
    a, b = _learner("epc", net), _learner("bp", twin)
    x, y = _problem()
    a.step(x, y)
    b.step(x, y)
    assert str(net) == structure == str(twin)


def test_incremental_spc_takes_a_weight_step_per_inference_step():
    torch.manual_seed(0)
    net = fpc.mlp([10, 16, 16, 4]).double()
    x, y = _problem(torch.float64)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    steps = []
    orig = opt.step
    opt.step = lambda *a, **k: (steps.append(1), orig(*a, **k))[1]
    learner = fpc.make_learner("spc", net, iters=4, incremental=True, optimizer=opt)
    learner.step(x, y)
    assert len(steps) == 4


def test_state_optimizer_adam_and_momentum_lower_the_energy():
    torch.manual_seed(0)
    net = fpc.mlp([10, 16, 16, 4]).double()
    x, y = _problem(torch.float64)
    for opts in ({"state_optimizer": "adam", "state_lr": 0.05}, {"momentum": 0.5, "state_lr": 0.1}):
        eq = fpc.make_learner("spc", net, iters=20, **opts).infer(x, y, trace=True)
        assert eq.trace[-1] < 0.7 * eq.trace[0], opts


@pytest.mark.parametrize("name", ["spc", "epc"])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_safeguard_never_lets_the_energy_rise(name, momentum):
    """With a step far past the stability limit plain descent blows up; the safeguarded one
    is monotone and still descends."""
    torch.manual_seed(0)
    net = fpc.mlp([10, 32, 32, 32, 4]).double()
    x, y = _problem(torch.float64)
    opts = dict(iters=15, state_lr=5.0, momentum=momentum)
    plain = fpc.make_learner(name, net, safeguard=False, **opts).infer(x, y, trace=True)
    learner = fpc.make_learner(name, net, safeguard=True, armijo=0.0, **opts)
    safe = learner.infer(x, y, trace=True)
    assert plain.trace.max() > 10 * plain.trace[0]
    assert torch.all(safe.trace[1:] <= safe.trace[:-1] * (1 + 1e-12))
    assert safe.trace[-1] < 0.9 * safe.trace[0]
    assert_close(safe.energy, safe.trace[-1])
    # untraced inference (what step() runs) ends at the same equilibrium
    assert_close(learner.infer(x, y).energy, safe.energy)


def test_callback_stops_inference_early():
    net = fpc.mlp([10, 16, 16, 4])
    x, y = _problem()
    seen = []
    eq = fpc.make_learner("epc", net, iters=50).infer(x, y, callback=lambda t, s: seen.append(t) or t == 7)
    assert seen == list(range(1, 8)) and eq.iters == 7


class _Quadratic(Relaxation):
    """E(v) = ½κ‖v‖² over one stacked variable."""

    def __init__(self, v0, kappa):
        self.v, self.kappa = Stack.of([v0], v0), kappa

    def forward(self):
        pass

    def moved(self, start):
        pass

    def energy(self):
        return 0.5 * self.kappa * self.v.flat.dot(self.v.flat)

    def parts(self):
        return self.energy()[None]

    def grad(self, out):
        torch.mul(self.v.flat, self.kappa, out=out.flat)
        return 0

    def states(self):
        return list(self.v.views)


@pytest.mark.parametrize("armijo", [0.0, 0.5, 0.9, 0.99])
def test_armijo_line_search_on_a_quadratic_closed_form(armijo):
    """On E(v) = ½κ‖v‖² with a first step far too large (η·κ > 2, E rises), the rejected
    step is refitted to η·κ = min(1, 1.8(1 − armijo)) exactly (the quadratic model is exact),
    after which every step is accepted: T − 1 contractions by (1 − η·κ). (armijo = 0: η·κ = 1
    to rounding, so v ends at zero to rounding: the update v − η·u is one fused multiply-add.)"""
    kappa = 10.0
    v0 = torch.tensor([[1.0, -2.0], [0.5, 3.0], [2.0, 0.0]], dtype=torch.float64)
    T = 6
    problem = _Quadratic(v0, kappa)
    minimize(problem, Descent(T, lr=1.0, safeguard=True, armijo=armijo))
    contraction = 1 - min(1.0, 1.8 * (1 - armijo))
    assert_close(problem.v.views[0], v0 * contraction ** (T - 1), rtol=1e-9, atol=1e-15)


class _SparseQuadratic(Relaxation):
    """E(v) = ½κ Σ_{i ≥ k} ‖v_i‖² over stacked tensors v_0, v_1, ...: the first k are not in E,
    their gradient is exactly zero (grad starts at tensor k, as sPC's does from the FF state).
    ``whole``: per-tensor stacks, the gradient handed over with put (the compiled step's way)."""

    def __init__(self, v0s, kappa, k, whole):
        self.v, self.kappa, self.k, self.whole = Stack.of(v0s, v0s[0], per_tensor=whole), kappa, k, whole

    def forward(self):
        pass

    def moved(self, start):
        pass

    def energy(self):
        tail = self.v.tail(self.v.offsets[self.k])
        return dot(tail, tail) * (0.5 * self.kappa)

    def parts(self):
        return self.energy()[None]

    def grad(self, out):
        out.put([None] * self.k + [t * self.kappa for t in self.v.views[self.k:]])
        return self.v.offsets[self.k]

    def states(self):
        return list(self.v.views)


def _sparse_v0():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, n, generator=g, dtype=torch.float64) for n in (2, 4, 1, 3)]


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("armijo", [0.0, 0.9])
def test_line_search_on_a_sparse_quadratic_flat_and_per_tensor(whole, sync_free, armijo):
    """The closed form of the quadratic test above with two tensors outside E, in a flat stack
    and per tensor, branching and sync-free: the rejected first step (η·κ = 10) restores the
    variables and the gradient from the tensor E starts at, the moving tensors contract by
    (1 − min(1, 1.8(1 − armijo)))^(T−1), and the tensors outside E keep their values bit for bit."""
    v0s, T = _sparse_v0(), 6
    problem = _SparseQuadratic(v0s, 10.0, 2, whole)
    minimize(problem, Descent(T, lr=1.0, safeguard=True, armijo=armijo), sync_free=sync_free)
    contraction = 1 - min(1.0, 1.8 * (1 - armijo))
    for i, (v, v0) in enumerate(zip(problem.v.views, v0s)):
        if i < 2:
            assert torch.equal(v, v0)
        else:
            assert_close(v, v0 * contraction ** (T - 1), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("opts", [dict(momentum=0.5), dict(optimizer="adam"), dict(momentum=0.5, safeguard=True)])
def test_per_tensor_descent_equals_flat(opts):
    """Momentum, Adam and the line search with momentum give the same variables and traces
    on per-tensor stacks as on the flat buffer (sums in another order: to rounding), and leave
    the tensors outside E untouched; plain SGD on ½κ‖v‖² has the closed form (1 − ηκ)^T."""
    T, runs = 5, []
    for whole in (False, True):
        problem = _SparseQuadratic(_sparse_v0(), 3.0, 1, whole)
        res = minimize(problem, Descent(T, lr=0.2, **opts), trace=True)
        runs.append((problem.states(), res))
    (flat, rf), (per, rp) = runs
    tol = two_path_tol(torch.float64, 64)  # sums over the 24 entries, 5 steps on
    for a, b in zip(flat, per, strict=True):
        assert_close(b, a, **tol)
    assert torch.equal(per[0], _sparse_v0()[0]) and torch.equal(flat[0], _sparse_v0()[0])
    assert_close(torch.stack(rp.grad_norms), torch.stack(rf.grad_norms), **tol)
    assert_close(torch.stack(rp.traces), torch.stack(rf.traces), **tol)
    problem = _SparseQuadratic(_sparse_v0(), 3.0, 1, True)
    minimize(problem, Descent(T, lr=0.2))
    for v, v0 in zip(problem.v.views[1:], _sparse_v0()[1:]):
        assert_close(v, v0 * (1 - 0.2 * 3.0) ** T, rtol=1e-12, atol=1e-15)


def test_default_epc_update_stays_aligned_with_bp_where_fixed_step_does_not():
    """A deep net with a large Jacobian: fixed-step ePC at η_e = 0.1 overshoots and its update
    points away from BP; the default line search (armijo 0.99, one step for the batch) keeps
    every block's update aligned with BP."""
    torch.manual_seed(0)
    net = fpc.mlp([10] + [32] * 11 + [4], init="orthogonal").double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.3)  # grow the deep Jacobian, as training does
    x, y = _problem(torch.float64)
    g_bp = fpc.make_learner("bp", net).grads(x, y)

    def cosines(learner):
        g = learner.grads(x, y)
        return torch.stack([torch.nn.functional.cosine_similarity(g[k].flatten(), g_bp[k].flatten(), 0)
                            for k in g_bp])

    fixed = cosines(fpc.make_learner("epc", net, iters=5, state_lr=0.1, safeguard=False))
    default = cosines(fpc.make_learner("epc", net, iters=5, state_lr=0.1))
    assert default.min() > 0.99, default
    assert fixed.min() < 0.5, fixed
