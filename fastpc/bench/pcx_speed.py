"""PCX side of ``fastpc bench speed``: sPC on an MLP, jit-compiled, timed after compilation.

Runs in its own virtual environment (PCX is JAX; see benchmarks/README.md), so it is a
standalone script: it ships inside fastpc but imports neither fastpc nor torch.

    python -m venv /path/to/pcxenv && /path/to/pcxenv/bin/pip install pcx==0.6.3
    fastpc bench speed --pcx-python /path/to/pcxenv/bin/python

The suite writes the exact batches it trains fastpc on (same data, same order) to an .npz and
calls this script with it; the script prints one JSON line with the per-step times.

The model follows PCX's own MLP examples: one ``Vode`` per hidden layer (forward init), the
output ``Vode`` with ``ce_energy`` frozen to the one-hot label, ``iters`` steps of optax SGD on
the hidden states (energy summed over the batch, as fastpc sums it), then one AdamW step on
the weights with the gradient scaled by 1/B. One jit-compiled function per training step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help=".npz with x (N, B, D) float32 and y (N, B) int64")
    p.add_argument("--widths", required=True, help="comma-separated layer widths, e.g. 784,128,128,128,10")
    p.add_argument("--act", default="gelu")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--state-lr", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the batches (median)")
    p.add_argument("--threads", type=int, default=0, help="unused; XLA picks its own")
    p.add_argument("--serve", action="store_true",
                   help="after compiling, time one pass per 'time' line on stdin ('time START COUNT': "
                        "those batches only), printing a JSON line with its seconds per step, until "
                        "'quit', so the caller can interleave PCX with its own runs")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import pcx as px
    import pcx.functional as pxf
    import pcx.nn as pxnn
    import pcx.predictive_coding as pxc
    import pcx.utils as pxu

    widths = [int(w) for w in args.widths.split(",")]
    act = {"gelu": lambda a: jax.nn.gelu(a, approximate=False), "relu": jax.nn.relu,
           "tanh": jnp.tanh}[args.act]

    class MLP(pxc.EnergyModule):
        def __init__(self):
            super().__init__()
            self.act_fn = px.static(act)
            self.layers = [pxnn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
            self.vodes = [pxc.Vode() for _ in widths[1:-1]] + [pxc.Vode(pxc.ce_energy)]
            self.vodes[-1].h.frozen = True

        def __call__(self, x, y=None):
            for v, layer in zip(self.vodes[:-1], self.layers[:-1]):
                x = v(self.act_fn(layer(x)))
            x = self.vodes[-1](self.layers[-1](x))
            if y is not None:
                self.vodes[-1].set("h", y)
            return self.vodes[-1].get("u")

    @pxf.vmap(pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0)), in_axes=(0, 0), out_axes=0)
    def forward(x, y, *, model):
        return model(x, y)

    @pxf.vmap(pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0)), in_axes=(0,), out_axes=(None, 0),
              axis_name="batch")
    def energy(x, *, model):
        y_ = model(x, None)
        return jax.lax.psum(model.energy(), "batch"), y_  # summed over the batch, like fastpc

    @pxf.jit(static_argnums=0)
    def train_on_batch(T, x, y, *, model, optim_w, optim_h):
        model.train()
        with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
            forward(x, y, model=model)
        optim_h.init(pxu.M_hasnot(pxc.VodeParam, frozen=True)(model))
        for _ in range(T):
            with pxu.step(model, clear_params=pxc.VodeParam.Cache):
                (e, y_), g = pxf.value_and_grad(
                    pxu.M_hasnot(pxc.VodeParam, frozen=True).to([False, True]), has_aux=True
                )(energy)(x, model=model)
            optim_h.step(model, g["model"])
        optim_h.clear()
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            (e, y_), g = pxf.value_and_grad(pxu.M(pxnn.LayerParam).to([False, True]), has_aux=True)(energy)(
                x, model=model)
        optim_w.step(model, g["model"], scale_by=1.0 / x.shape[0])
        return e

    data = np.load(args.data)
    xs = [jnp.asarray(b.reshape(b.shape[0], -1)) for b in data["x"]]
    ys = [jax.nn.one_hot(jnp.asarray(b), widths[-1]) for b in data["y"]]
    B = xs[0].shape[0]

    px.RKG.seed(0)
    model = MLP()
    with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
        forward(jnp.zeros((B, widths[0])), None, model=model)
    optim_h = pxu.Optim(lambda: optax.sgd(args.state_lr))
    optim_w = pxu.Optim(lambda: optax.adamw(args.lr), pxu.M(pxnn.LayerParam)(model))

    def sync():
        jax.block_until_ready(model.layers[0].nn.weight.get())

    t0 = time.perf_counter()
    e = train_on_batch(args.iters, xs[0], ys[0], model=model, optim_w=optim_w, optim_h=optim_h)
    jax.block_until_ready(e)
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
        train_on_batch(args.iters, xs[i % len(xs)], ys[i % len(xs)], model=model, optim_w=optim_w, optim_h=optim_h)
    sync()
    def one_pass(start: int = 0, count: int | None = None) -> float:
        """Seconds per step over batches start .. start + count (all by default), after one
        untimed warm-up step (as the fastpc side does)."""
        stop = len(xs) if count is None else start + count
        train_on_batch(args.iters, xs[start], ys[start], model=model, optim_w=optim_w, optim_h=optim_h)
        sync()
        t0 = time.perf_counter()
        for x, y in zip(xs[start:stop], ys[start:stop]):
            train_on_batch(args.iters, x, y, model=model, optim_w=optim_w, optim_h=optim_h)
        sync()
        return (time.perf_counter() - t0) / (stop - start)

    per_step = []
    if args.serve:
        print(json.dumps({"ready": True, "compile_s": compile_s}), flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] != "time":
                break
            rng = (int(words[1]), int(words[2])) if len(words) == 3 else (0, None)
            per_step.append(one_pass(*rng))
            print(json.dumps({"step_s": per_step[-1]}), flush=True)
    else:
        per_step = [one_pass() for _ in range(args.repeats)]
    print(json.dumps({
        "per_step_s": per_step,
        "compile_s": compile_s,
        "batches": len(xs),
        "batch_size": B,
        "pcx_version": getattr(px, "__version__", "0.6.3"),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
