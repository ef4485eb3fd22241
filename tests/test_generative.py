"""Generative mode (x=None: the latent s_0 free, the data clamped at the output) and the latent
initializers ``memory`` and ``amortized`` (PAPERS.md §3), against closed forms and autograd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from numerics import two_path_tol

import fastpc as fpc
from fastpc import energy as E
from fastpc.init_latent import MemoryInit

F64 = torch.float64
PRESET = Path(fpc.__file__).parent / "presets" / "fmnist-generative-spc.yaml"


def linear_generator(d0=3, d1=5, D=6, seed=0) -> fpc.PCNet:
    """y = W_2 (W_1 s_0 + b_1) + b_2: an mlp with identity activations and random biases."""
    torch.manual_seed(seed)
    net = fpc.mlp([d0, d1, D], act="identity").to(F64)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.normal_()
    return net


def map_latent(net: fpc.PCNet, y: torch.Tensor, prior: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimiser (s_0, s_1) of E = ½p‖s_0‖² + ½‖s_1 − W_1 s_0 − b_1‖² + ½‖y − W_2 s_1 − b_2‖²:
    the one linear system ∇E = 0,
    [[pI + W_1ᵀW_1, −W_1ᵀ], [−W_1, I + W_2ᵀW_2]] [s_0; s_1] = [−W_1ᵀb_1; b_1 + W_2ᵀ(y − b_2)]."""
    lin = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    (W1, b1), (W2, b2) = [(m.weight, m.bias) for m in lin]
    d0, d1 = W1.shape[1], W1.shape[0]
    H = torch.zeros(d0 + d1, d0 + d1, dtype=F64)
    H[:d0, :d0] = prior * torch.eye(d0, dtype=F64) + W1.T @ W1
    H[:d0, d0:] = -W1.T
    H[d0:, :d0] = -W1
    H[d0:, d0:] = torch.eye(d1, dtype=F64) + W2.T @ W2
    rhs = torch.cat([(-W1.T @ b1).expand(y.shape[0], d0), b1 + (y - b2) @ W2], 1)  # (B, d0 + d1)
    z = torch.linalg.solve(H, rhs.T).T
    return z[:, :d0], z[:, d0:]


@pytest.mark.parametrize("learner,opts", [("spc", {}), ("epc", {"safeguard": False})])
@pytest.mark.parametrize("prior", [1.0, 0.0])
def test_linear_generator_reaches_map_latent(learner, opts, prior):
    net = linear_generator()
    y = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    lrn = fpc.make_learner(learner, net, loss="mse", iters=3000, state_lr=0.2, init="zeros", prior=prior, **opts)
    eq = lrn.infer(None, y)
    s0, s1 = map_latent(net, y, prior)
    tol = two_path_tol(F64, 1000)
    torch.testing.assert_close(eq.states[0], s0, **tol)
    torch.testing.assert_close(eq.states[1], s1, **tol)
    assert eq.output.shape == y.shape and eq.iters == 3000


def energy_of(net, states, y, prior):
    """The generative energy from fastpc.energy's pure functions, with autograd."""
    preds, yhat = E.predictions(net.blocks, None, states)
    return E.energy(E.errors(states, preds), yhat, y, "mse") + E.latent_prior(states[0], prior)


@pytest.mark.parametrize("learner", ["spc", "epc"])
def test_latent_gradient_is_autograd_of_the_energy(learner):
    """Two plain steps of size 1: the second moves every variable by −∇E at the states after the
    first. sPC's variables are the states; ePC's are (s_0, ε), E(s_0, ε) through the rebuilt states."""
    torch.manual_seed(0)
    net = fpc.mlp([3, 7, 5, 6], act="gelu").to(F64)
    y = torch.randn(4, 6, dtype=F64)
    seen = []
    lrn = fpc.make_learner(learner, net, loss="mse", iters=2, state_lr=1.0, init="normal", prior=0.7,
                           **({"safeguard": False} if learner == "epc" else {}))
    lrn.infer(None, y, callback=lambda t, states: seen.append([s.clone() for s in states]))
    (s_a, s_b) = seen
    tol = two_path_tol(F64, 100)
    if learner == "spc":
        v = [s.clone().requires_grad_(True) for s in s_a]
        grads = torch.autograd.grad(energy_of(net, v, y, 0.7), v)
        for before, after, g in zip(s_a, s_b, grads):
            torch.testing.assert_close(before - after, g, **tol)
        return

    def rebuild(s0, eps):  # the perturbed forward pass from s_0
        states, s = [s0], s0
        for block, e in zip(net.blocks[:-1], eps):
            s = block(s) + e
            states.append(s)
        return states

    def errs(states):
        return [s - b(p) for b, p, s in zip(net.blocks, states[:-1], states[1:])]

    with torch.no_grad():
        eps_a, eps_b = errs(s_a), errs(s_b)
    v = [s_a[0].clone().requires_grad_(True), *[e.clone().requires_grad_(True) for e in eps_a]]
    grads = torch.autograd.grad(energy_of(net, rebuild(v[0], v[1:]), y, 0.7), v)
    for before, after, g in zip([s_a[0], *eps_a], [s_b[0], *eps_b], grads):
        torch.testing.assert_close(before - after, g, **tol)


# ---- memory --------------------------------------------------------------------------------------
def test_memory_retrieves_a_stored_latent_with_its_own_key_and_forgets_first_in_first_out():
    g = torch.Generator().manual_seed(0)
    y, s0 = torch.randn(6, 10, dtype=F64, generator=g), torch.randn(6, 3, dtype=F64, generator=g)
    hidden = torch.randn(6, 4, dtype=F64, generator=g)
    mem = MemoryInit(capacity=4, beta=1e4)
    template = torch.zeros(6, 3, dtype=F64)
    assert torch.equal(mem([template], None, y)[0], template)  # empty memory: s_0 = 0
    mem.observe(None, y[:3], [s0[:3], hidden[:3]])
    mem.observe(None, y[3:], [s0[3:], hidden[3:]])  # 6 written into 4 slots: items 0 and 1 replaced
    assert len(mem) == 4
    out = mem([template], None, y)[0]
    tol = two_path_tol(F64, 10)
    torch.testing.assert_close(out[2:], s0[2:], **tol)  # own key: softmax weight 1 at β = 1e4
    for i in (0, 1):  # forgotten: what comes back is another item's latent
        assert min(float((out[i] - s0[j]).abs().max()) for j in range(2, 6)) < tol["atol"]


def test_memory_is_softmax_attention_over_normalised_keys():
    g = torch.Generator().manual_seed(1)
    y, s0 = torch.randn(5, 8, dtype=F64, generator=g), torch.randn(5, 2, dtype=F64, generator=g)
    q = torch.randn(3, 8, dtype=F64, generator=g)
    mem = MemoryInit(capacity=16, beta=2.5)
    mem.observe(None, y, [s0])
    K = y / y.norm(dim=1, keepdim=True)
    w = torch.softmax(2.5 * (q / q.norm(dim=1, keepdim=True)) @ K.T, dim=1)
    torch.testing.assert_close(mem([torch.zeros(3, 2, dtype=F64)], None, q)[0], w @ s0, **two_path_tol(F64, 20))


# ---- amortized -----------------------------------------------------------------------------------
def toy_data(n=64, seed=0):
    """Images of a fixed 2-d linear generator plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(10, 2, dtype=F64, generator=g)
    return torch.randn(n, 2, dtype=F64, generator=g) @ A.T + 0.05 * torch.randn(n, 10, dtype=F64, generator=g)


def test_amortized_recognition_loss_falls_and_consistency_improves():
    torch.manual_seed(0)
    net = fpc.mlp([2, 8, 10], act="tanh").to(F64)
    lrn = fpc.make_learner("spc", net, loss="mse", iters=30, state_lr=0.1, init="amortized",
                           init_options={"lr": 1e-2, "act": "tanh"}, optimizer=torch.optim.Adam(net.parameters(), 1e-3))
    y = toy_data()
    losses, cons = [], []
    for step in range(300):
        lrn.step(None, y)
        losses.append(float(lrn.init.last_loss.sum()))
        if step in (0, 299):
            cons.append(lrn.init.consistency(net, lrn.infer(None, y).states))
    assert sum(losses[-10:]) < 0.2 * sum(losses[:10])
    assert cons[1].shape == (2,) and bool((cons[1] < 0.5 * cons[0]).all()), cons
    # its single pass now starts inference nearer the equilibrium than s_0 = 0 does
    start = lrn.init([torch.zeros(64, 2, dtype=F64)], None, y)[0]
    final = lrn.infer(None, y).states[0]
    assert (start - final).norm() < 0.5 * final.norm()


@pytest.mark.parametrize("init", ["memory", "amortized"])
def test_latent_init_state_round_trips_and_resumes_bit_for_bit(init, tmp_path):
    y = toy_data(32)

    def learner(seed):
        torch.manual_seed(seed)
        net = fpc.mlp([2, 8, 10], act="tanh").to(F64)
        return fpc.make_learner("spc", net, loss="mse", iters=5, state_lr=0.1, init=init,
                                optimizer=torch.optim.Adam(net.parameters(), 1e-3))

    a = learner(0)
    for _ in range(3):
        a.step(None, y)
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    b = learner(1)  # another net, an initializer that has seen nothing
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    for _ in range(2):
        a.step(None, y)
        b.step(None, y)
    for sa, sb in ((a.net.state_dict(), b.net.state_dict()), (a.init.state_dict(), b.init.state_dict())):
        assert sa.keys() == sb.keys() and len(sa) > 0
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    a.to(torch.float32)  # .to() carries the initializer's buffers
    assert all(t.dtype in (torch.float32, torch.int64) for t in a.init.state_dict().values())


# ---- bad input -----------------------------------------------------------------------------------
def test_generative_bad_input_is_one_clear_error():
    net = fpc.mlp([3, 5, 6]).to(F64)
    y = torch.randn(4, 6, dtype=F64)
    spc = fpc.make_learner("spc", net, loss="mse", iters=2, init="memory")
    with pytest.raises(ValueError, match="not class indices"):
        spc.infer(None, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="output's shape"):
        spc.infer(None, torch.randn(4, 7, dtype=F64))
    with pytest.raises(ValueError, match="loss 'mse'"):
        fpc.make_learner("epc", net, loss="ce").infer(None, y)
    with pytest.raises(ValueError, match="generative mode"):
        fpc.make_learner("bp", net, loss="mse").infer(None, y)
    with pytest.raises(ValueError, match="generative mode"):
        fpc.make_learner("spc", net, loss="mse", schedule="sequential").infer(None, y)
    with pytest.raises(ValueError, match="generative net"):  # a latent init on a discriminative step
        spc.infer(torch.randn(4, 3, dtype=F64), y)
    # a memory built for a latent of size 3 loaded beside a net whose latent has size 2
    spc.init.observe(None, y, [torch.randn(4, 3, dtype=F64)])
    other = fpc.make_learner("spc", fpc.mlp([2, 5, 6]).to(F64), loss="mse", init="memory")
    other.load_state_dict({**spc.state_dict(), "net": other.net.state_dict()})
    with pytest.raises(ValueError, match="latent of size 3"):
        other.infer(None, y)
    with pytest.raises(ValueError, match="starts with an nn.Linear"):
        fpc.make_learner("spc", fpc.vgg("vgg5", in_channels=1, num_classes=4, image_size=16, width_mult=1 / 32),
                         loss="mse").infer(None, torch.randn(2, 4))


# ---- fastpc train in generative mode -------------------------------------------------------------
@pytest.mark.usefixtures("isolated")
def test_train_generative_preset_writes_metrics_and_plots(data_root, tmp_path, capsys):
    from tinydata import tiny_overrides

    from fastpc.cli import main

    run = tmp_path / "run"
    sets = tiny_overrides(data_root, run, **{"model.widths": "[16, 32]", "model.latent": 4, "train.epochs": 2})
    assert main(["train", "fmnist-generative-spc", "--set", *sets]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["config"]["model"]["mode"] == "generative"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3
    recon = summary["generative"]["recon_error"]
    assert recon == summary["test_loss"] and 0 < recon < 0.5 * 64 * 2.0  # well below the data's energy
    assert [c["epoch"] for c in summary["generative"]["consistency"]] == [1, 2]
    for png in ("reconstructions.png", "samples.png", "curves.png", "energy.png"):
        assert (run / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test reconstruction error" in capsys.readouterr().out
    # eval re-runs inference on the test images from the checkpoint: the summary's number again
    assert main(["eval", str(run)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["test_recon_error"] == pytest.approx(recon, rel=1e-6) and "test_acc" not in res
    assert main(["report", str(run)]) == 0
    assert "test reconstruction error" in capsys.readouterr().out
    for bad, needle in ((["learner.name=bp", "learner.prior=null"], "generative"), (["learner.loss=ce"], "learner.loss=mse"),
                        (["model.latent=0"], "model.latent"), (["model.mode=discriminative"], "model.latent")):
        rc = main(["train", "fmnist-generative-spc", "--set", *tiny_overrides(data_root, tmp_path / "bad"), *bad])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err, err


@pytest.mark.usefixtures("isolated")
def test_train_generative_resume_is_bit_for_bit(data_root, tmp_path, init="amortized"):
    """1 epoch + resume for a 2nd gives the weights and initializer state (the recognition net and
    its Adam moments) of 2 epochs straight."""
    from tinydata import tiny_overrides

    from fastpc.config import load_config
    from fastpc.train import CHECKPOINT, fit, load_checkpoint

    def cfg(out, epochs):
        sets = tiny_overrides(data_root, out, **{"model.widths": "[16]", "model.latent": 4, "train.epochs": epochs,
                                                 "learner.init": init, "learner.init_options": "{}"})
        return load_config(PRESET, sets)

    fit(cfg(tmp_path / "full", 2))
    fit(cfg(tmp_path / "part", 1))
    fit(cfg(tmp_path / "part", 2), resume=True)
    full, part = (load_checkpoint(tmp_path / r / CHECKPOINT)["learner"] for r in ("full", "part"))
    for key in ("net", "init"):
        assert full[key].keys() == part[key].keys() and len(full[key]) > 0
        assert all(torch.equal(full[key][k], part[key][k]) for k in full[key]), key
