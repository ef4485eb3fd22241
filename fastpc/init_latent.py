"""Initializers of a generative PCN's latent (PAPERS.md §3): ``memory`` and ``amortized``.

In generative mode (``learner.step(None, images)``) a learner asks its initializer for the latent
only: ``init([template], None, y)`` with ``template`` zeros shaped like s_0, (B, d), and ``y`` the
data; the hidden states then start at the FF pass from s_0. After each training step
``observe(None, y, states)`` hands over the converged states s_0 .. s_{L-1}. Test-time inference
(``learner.infer``) only reads them.

Both are built on the first batch they observe (their sizes come from the data and the states)
and start from s_0 = 0 until then. What they learn lives in buffers and parameters, so
``state_dict`` (checkpoints, loaded into a fresh initializer too) and ``Learner.to`` carry it,
and a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .init import StateInit, register_init
from .nets import make_act

__all__ = ["MemoryInit", "AmortizedInit"]


class _LatentInit(StateInit):
    """The generative-only door and buffers built lazily (from a checkpoint's shapes on load)."""

    modes = ("generative",)

    def _query(self, ff_states: Sequence[torch.Tensor], x: torch.Tensor | None,
               y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the latent's template (B, d), the data flattened (B, D)), or a clear error."""
        if x is not None or y is None or len(ff_states) != 1:
            raise ValueError(f"init {self.name!r} initialises the latent of a generative net "
                             "(learner.step(None, images)); a discriminative net takes forward, zeros, normal, "
                             "previous or class_average")
        return ff_states[0], y.flatten(1)

    def _check_sizes(self, template: torch.Tensor, data: torch.Tensor, latent: int, features: int) -> None:
        if template.shape[1:] != (latent,) or data.shape[1] != features:
            raise ValueError(f"init {self.name!r} was built for a latent of size {latent} and data of {features} "
                             f"features; this net's latent s_0 has shape {tuple(template.shape[1:])} and the data "
                             f"{data.shape[1]} features")

    def _build_from_state(self, state_dict: dict, prefix: str) -> None:
        """Build what is not built yet from the tensors of a state dict (default: nothing)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._build_from_state(state_dict, prefix)
        for name, buf in self._buffers.items():  # a buffer not built yet takes the checkpoint's shape
            if buf is None and prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


@register_init("memory")
class MemoryInit(_LatentInit):
    """A bounded continuous Hopfield (attention) memory of earlier converged latents, keyed by
    the data: s_0 = softmax(β · q Kᵀ) V with q the batch's data, K the stored data and V their
    converged latents. Queries and keys are L2-normalised (a stored key is then its own best
    match, while raw dot products favour long keys), so β is an inverse temperature on cosine
    similarities. ``capacity`` entries, replaced first in, first out. An empty memory gives
    s_0 = 0.
    """

    def __init__(self, capacity: int = 1024, beta: float = 20.0):
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"memory init needs an integer capacity >= 1, got {capacity!r}")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"memory init needs a finite beta > 0, got {beta!r}")
        self.capacity, self.beta = int(capacity), float(beta)
        self.register_buffer("keys", None)  # (capacity, D) normalised data
        self.register_buffer("values", None)  # (capacity, d) latents
        self.register_buffer("count", None)  # () latents written so far

    def options(self):
        return {"capacity": self.capacity, "beta": self.beta}

    def __len__(self) -> int:
        return 0 if self.count is None else min(int(self.count), self.capacity)

    def forward(self, ff_states, x, y):
        template, data = self._query(ff_states, x, y)
        n = len(self)
        if n == 0:
            return [torch.zeros_like(template)]
        self._check_sizes(template, data, self.values.shape[1], self.keys.shape[1])
        w = torch.softmax(self.beta * F.normalize(data, dim=1) @ self.keys[:n].T, dim=1)  # (B, n)
        return [w @ self.values[:n]]

    @torch.no_grad()
    def observe(self, x, y, states):
        if x is not None:
            return
        data, latent = y.flatten(1), states[0].flatten(1)
        if self.keys is None:
            self.keys = data.new_zeros(self.capacity, data.shape[1])
            self.values = latent.new_zeros(self.capacity, latent.shape[1])
            self.count = torch.zeros((), dtype=torch.int64, device=data.device)
        m = min(data.shape[0], self.capacity)  # a batch larger than the memory leaves its last entries
        slots = (int(self.count) + data.shape[0] - m + torch.arange(m, device=data.device)) % self.capacity
        self.keys[slots] = F.normalize(data[-m:], dim=1)
        self.values[slots] = latent[-m:]
        self.count += data.shape[0]


@register_init("amortized")
class AmortizedInit(_LatentInit):
    """A bottom-up recognition network f whose single pass initialises the latent (Bengio et al.
    2016; JPC's amortised PC). It mirrors the generator g = (g_1 .. g_L): layer f_l maps s_l to
    s_{l-1} (f_L reads the data), Linear + ``act``, the last (→ s_0) plain Linear. After every
    training step it learns by a local delta rule on its own errors: each layer's loss is
    ½‖s*_{l-1} − f_l(ẑ_l)‖² / B with s* the converged states and ẑ_l the recognition net's own
    guess of the layer above (detached; the data for f_L), one Adam step (``lr``) over all layers.

    Built on the first batch it observes (its widths from the data and the converged states);
    s_0 = 0 until then. :meth:`consistency` is the autoencoder consistency ‖f_l(g_l(s)) − s‖.
    """

    def __init__(self, lr: float = 1e-3, act: str = "gelu"):
        super().__init__()
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"amortized init needs a finite lr > 0, got {lr!r}")
        make_act(act)  # ValueError naming the activations
        self.lr, self.act = float(lr), act
        self.layers: nn.ModuleList | None = None  # f_L .. f_1, data → s_{L-1} → … → s_0
        self.register_buffer("widths", None)  # (L + 1,) [D, d_{L-1}, …, d_0]
        self.register_buffer("steps", None)  # () Adam steps taken
        self.last_loss: torch.Tensor | None = None  # per layer (f_L first), at the last observe

    def options(self):
        return {"lr": self.lr, "act": self.act}

    def _build(self, widths: list[int], like: torch.Tensor) -> None:
        n = len(widths) - 1
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), *([make_act(self.act)] if k < n - 1 else []))
            for k, (a, b) in enumerate(zip(widths[:-1], widths[1:]))).to(dtype=like.dtype, device=like.device)
        self.widths = torch.tensor(widths, dtype=torch.int64, device=like.device)
        self.steps = torch.zeros((), dtype=torch.int64, device=like.device)
        for i, p in enumerate(self.layers.parameters()):  # Adam's moments, buffers like the rest
            self.register_buffer(f"adam_m{i}", torch.zeros_like(p))
            self.register_buffer(f"adam_v{i}", torch.zeros_like(p))

    def _build_from_state(self, state_dict, prefix):
        if self.layers is None and prefix + "widths" in state_dict:
            like = state_dict[prefix + "layers.0.0.weight"]
            self._build(state_dict[prefix + "widths"].tolist(), like)

    def guesses(self, y: torch.Tensor) -> list[torch.Tensor]:
        """The recognition pass from the data: [ẑ_{L-1}, …, ẑ_0] (no grad)."""
        a, out = y.flatten(1), []
        with torch.no_grad():
            for layer in self.layers:
                a = layer(a)
                out.append(a)
        return out

    def forward(self, ff_states, x, y):
        template, data = self._query(ff_states, x, y)
        if self.layers is None:
            return [torch.zeros_like(template)]
        w = self.widths.tolist()
        self._check_sizes(template, data, w[-1], w[0])
        return [self.guesses(data)[-1]]

    def observe(self, x, y, states):
        if x is not None:
            return
        data = y.flatten(1)
        targets = [s.detach().flatten(1) for s in reversed(states)]  # s*_{L-1}, …, s*_0
        if self.layers is None:
            self._build([data.shape[1], *(t.shape[1] for t in targets)], data)
        B, a, losses, grads = data.shape[0], data, [], []
        params = list(self.layers.parameters())
        with torch.enable_grad():
            for layer, target in zip(self.layers, targets):
                pred = layer(a.detach())
                loss = 0.5 * (pred - target).pow(2).sum() / B
                grads += torch.autograd.grad(loss, list(layer.parameters()))
                losses.append(loss.detach())
                a = pred
        self.last_loss = torch.stack(losses)
        if all(bool(torch.isfinite(g).all()) for g in grads):  # a step that overflows is not taken
            self._adam(params, grads)

    @torch.no_grad()
    def _adam(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """One Adam step (β = 0.9, 0.999, ε = 1e-8) with the moments in buffers."""
        b1, b2 = 0.9, 0.999
        self.steps += 1
        t = int(self.steps)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        for i, (p, g) in enumerate(zip(params, grads)):
            m, v = getattr(self, f"adam_m{i}"), getattr(self, f"adam_v{i}")
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(1e-8), value=-self.lr / c1)

    @torch.no_grad()
    def consistency(self, net: nn.Module, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Autoencoder consistency per layer, (L,): entry l − 1 is the batch mean of
        ‖f_l(g_l(s_{l-1})) − s_{l-1}‖ with g_l = ``net.blocks[l-1]`` (the generator) and
        ``states`` = s_0 .. s_{L-1} (e.g. ``learner.infer(None, y).states``). Small where the
        recognition layer inverts the generative one on these states (Bengio et al. 2016)."""
        if self.layers is None:
            raise ValueError("the amortized init has observed no batch yet: nothing to measure")
        L = len(self.layers)
        if len(net.blocks) != L or len(states) != L:
            raise ValueError(f"consistency needs the generator's {L} blocks and its {L} states s_0 .. s_{L - 1}, "
                             f"got {len(net.blocks)} blocks and {len(states)} states")
        out = []
        for l in range(1, L + 1):
            s = states[l - 1]
            back = self.layers[L - l](net.blocks[l - 1](s).flatten(1))
            out.append((back - s.flatten(1)).norm(dim=1).mean())
        return torch.stack(out)
