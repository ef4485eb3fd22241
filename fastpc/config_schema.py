"""The run configuration's schema: five sections, one dataclass each, every field documented.

The dataclass defaults *are* the built-in quickstart (ePC on a 4-layer MLP on Fashion-MNIST for
one epoch). Each section validates itself in ``__post_init__`` and raises
:class:`fastpc.UserError` with one line naming the key, what was given and what is accepted.
Reading YAML, ``--set`` overrides and type coercion live in :mod:`fastpc.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UserError

__all__ = ["Config", "DataConfig", "ModelConfig", "LearnerConfig", "OptimConfig", "TrainConfig", "fail", "choice", "one_line"]


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def fail(key: str, msg: str) -> None:
    raise UserError(f"{key}: {msg}")


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    """Dataset: fashion-mnist, mnist, kmnist, cifar10, cifar100 or imagefolder."""
    root: str | None = None
    """Folder holding the data (searched before $FASTPC_DATA, the cache and system paths)."""
    batch_size: int = 128
    """Training mini-batch size."""
    eval_batch_size: int = 1000
    """Batch size for validation and test evaluation."""
    val_split: float = 0.0
    """Fraction of the training split held out for validation, in [0, 1)."""
    download: bool = True
    """Download (md5-verified) when the data is not found locally."""
    augment: bool | None = None
    """Random crop + flip on training batches; null = on for CIFAR / image folders only."""
    image_size: int | list[int] | None = None
    """Resize every image to this size (an int, or [height, width]); null = as stored. Needed for
    image folders whose images differ in size."""
    grouped: int | None = None
    """Label-grouped ("stream-aligned") training batches for ``learner.init: class_average``:
    each batch holds at most this many classes (1: one class per batch), cut from per-class
    shuffles in an order seeded by (train.seed, epoch) like the shuffled order, so a resumed run
    sees the same batches; null = plainly shuffled batches."""
    stream: bool | Literal["auto"] = "auto"
    """Image folders: decode and augment each batch on the fly in ``workers`` DataLoader processes
    (random-resized crop + flip for training, resize to image_size·256/224 + center crop for
    evaluation) instead of holding the split in memory; needs image_size. auto: stream when
    image_size is at least 128 or the training split has more than 50,000 images (and not with
    grouped); other datasets are always in memory."""
    workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes of a streamed image folder (0: decode in the training
    process); auto = min(8, CPU cores per process on the node)."""

    def __post_init__(self) -> None:
        from .data.imagefolder import parse_image_size
        from .data.sources import DATASET_NAMES, check_name

        try:
            self.name = check_name(self.name)
        except UserError:
            choice("data.name", self.name, list(DATASET_NAMES))
        if self.batch_size < 1:
            fail("data.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            fail("data.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        if not 0.0 <= self.val_split < 1.0:
            fail("data.val_split", f"must be in [0, 1), got {self.val_split}")
        parse_image_size(self.image_size)
        if self.stream is True and (self.name != "imagefolder" or self.image_size is None or self.grouped):
            fail("data.stream", "true needs data.name=imagefolder with data.image_size set and data.grouped null "
                 f"(got name={self.name}, image_size={self.image_size}, grouped={self.grouped}); use false or auto")
        if self.workers != "auto" and self.workers < 0:
            fail("data.workers", f"must be >= 0 or auto, got {self.workers}")
        if self.grouped is not None and not 1 <= self.grouped <= self.batch_size:
            fail("data.grouped", f"must be null or classes per batch in [1, data.batch_size={self.batch_size}], "
                 f"got {self.grouped}")


@dataclass
class ModelConfig:
    arch: Literal["mlp", "vgg", "resnet"] = "mlp"
    """Architecture family: mlp, vgg or resnet."""
    widths: list[int] | None = None
    """MLP hidden widths, e.g. [128, 128, 128]; input and output sizes come from the dataset.
    null = ``depth - 1`` hidden layers of ``width``."""
    depth: int = 4
    """MLP: number of linear layers (blocks); depth 4 on Fashion-MNIST is 784-128-128-128-10."""
    width: int = 128
    """MLP hidden width used when ``widths`` is null."""
    name: str | None = None
    """vgg: vgg5, vgg7, vgg9 or vgg10; resnet: resnet18 (the default for resnet)."""
    act: str = "gelu"
    """Activation: relu, gelu, tanh, sigmoid, silu, leaky_relu or identity (mlp, vgg)."""
    weight_init: str = "orthogonal"
    """Weight initialisation: orthogonal, kaiming_uniform, gaussian or default (mlp, vgg)."""
    width_mult: float = 1.0
    """Channel multiplier for vgg / resnet (e.g. 0.25 for CPU-sized runs)."""
    mode: Literal["discriminative", "generative"] = "discriminative"
    """discriminative (images in, labels out) or generative (mlp only: a free latent of size
    ``latent`` generates the images, clamped at the output; learner spc or epc with loss mse)."""
    latent: int | None = None
    """Generative mode: the latent size, the generator's input width (required there; null otherwise)."""

    def __post_init__(self) -> None:
        from .nets import ACTIVATIONS, VGG_CONFIGS

        if self.widths is not None and (len(self.widths) < 1 or min(self.widths) < 1):
            fail("model.widths", f"must be a non-empty list of positive integers, got {self.widths}")
        if self.depth < 1:
            fail("model.depth", f"must be >= 1, got {self.depth}")
        if self.width < 1:
            fail("model.width", f"must be >= 1, got {self.width}")
        if not 0.0 < self.width_mult <= 64.0:
            fail("model.width_mult", f"must be in (0, 64], got {self.width_mult}")
        if self.mode == "generative" and (self.latent is None or self.latent < 1 or self.arch != "mlp"):
            fail("model.latent" if self.arch == "mlp" else "model.arch",
                 f"model.mode=generative needs model.arch=mlp and a latent size model.latent >= 1, got "
                 f"arch={self.arch}, latent={self.latent}")
        if self.mode != "generative" and self.latent is not None:
            fail("model.latent", f"is only used with model.mode=generative (mode is {self.mode}); set it to null")
        choice("model.act", self.act, sorted(ACTIVATIONS))
        choice("model.weight_init", self.weight_init, ["orthogonal", "kaiming_uniform", "gaussian", "default"])
        names = {"vgg": sorted(VGG_CONFIGS), "resnet": ["resnet18"], "mlp": []}[self.arch]
        if self.arch == "vgg" and self.name is None:
            fail("model.name", f"is required with model.arch=vgg; expected one of {names}")
        if self.name is not None:
            if self.arch == "mlp":
                fail("model.name", "is only used by vgg and resnet; set it to null for mlp")
            choice("model.name", self.name, names)


@dataclass
class LearnerConfig:
    name: str = "epc"
    """Learning algorithm, a registered learner: bp, spc or epc (see ``fastpc.list_learners()``)."""
    loss: Literal["ce", "mse"] = "ce"
    """Output cost: ce (cross-entropy) or mse (½‖ŷ − onehot(y)‖²)."""
    iters: int = 5
    """T, inference iterations per batch (ignored by bp)."""
    state_lr: float = 0.1
    """Inference step size (λ for sPC, η_e for ePC)."""
    init: str = "forward"
    """State initializer: forward, zeros, normal, ... (see ``fastpc.list_inits()``)."""
    init_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Options of the state initializer, e.g. {std: 0.5} for normal (see ``fastpc.init.init_options``)."""
    momentum: float = 0.0
    """Momentum of the inference optimizer, in [0, 1)."""
    state_optimizer: Literal["sgd", "adam"] = "sgd"
    """Inference optimizer for spc: sgd or adam."""
    incremental: bool = False
    """spc only: iPC, a weight step after every inference step."""
    rescale: bool = False
    """epc only: divide the weight update by min(1, state_lr·iters), as the reference code does."""
    safeguard: bool | None = None
    """spc/epc: backtracking line search on inference steps, one step size per batch (see ``armijo``);
    null: the learner's default (on for epc, off for spc)."""
    armijo: float | None = None
    """With safeguard: a step must decrease the batch energy by this fraction of the decrease
    its gradient predicts (0: must not rise; 0.99: keeps epc's update aligned with BP);
    null: the learner's default (0.99 for epc, 0 for spc)."""
    tol: float | None = None
    """spc/epc: stop inference when ‖∇E‖ / ‖∇E at the start‖ < tol (iters is then the cap);
    null: run all iters."""
    armijo_steps: int | None = None
    """spc/epc with safeguard: the steps the Armijo constant governs; after them a step need only
    not raise the energy and grows while safe, so long inference converges (null: 20)."""
    prior: float | None = None
    """spc/epc in generative mode: weight of the latent's prior ½‖s_0‖² in the energy (null: 1)."""
    schedule: Literal["simultaneous", "sequential"] = "simultaneous"
    """spc only: simultaneous (every layer steps at once) or sequential (SeqIL: iters top-down
    sweeps with steps state_lr/(1+t), run eagerly; not with momentum, adam, safeguard, tol, incremental)."""
    beta: float | None = None
    """spc (schedule sequential): soft-clamp the target, m = 1/(1+beta); ep: the nudge strength β;
    null: the learner's default."""
    estimator: str | None = None
    """ep only: centered, positive, negative, random or clamp (null: centered)."""
    equilibration: str | None = None
    """ep only: mod_pgd, pgd, gd or fixed_point (null: mod_pgd where every block ends in ReLU or Identity, else gd)."""
    compile: bool | Literal["auto"] = "auto"
    """spc/epc on an MLP with init forward: run each training step (FF pass, inference, local
    update) as one torch.compile graph, for batches of the training batch size. Same maths as
    the eager fast path, less time per step after a one-off compile (benchmarks/README.md).
    auto: on for CPU runs of at least 40,000 training steps (where compiling pays back) when a
    C++ compiler is available; off on CUDA (set true to try it)."""

    def __post_init__(self) -> None:
        from .init import list_inits
        from .learners import list_learners

        choice("learner.name", self.name, list_learners())
        choice("learner.init", self.init, list_inits())
        from .init import check_init_options

        try:
            check_init_options(self.init, self.init_options)
        except ValueError as e:
            fail("learner.init_options", str(e))
        if self.iters < 0:
            fail("learner.iters", f"must be >= 0, got {self.iters}")
        if not self.state_lr > 0:
            fail("learner.state_lr", f"must be > 0, got {self.state_lr}")
        if not 0.0 <= self.momentum < 1.0:
            fail("learner.momentum", f"must be in [0, 1), got {self.momentum}")
        if self.armijo is not None and not 0.0 <= self.armijo < 1.0:
            fail("learner.armijo", f"must be in [0, 1), got {self.armijo}")

    def options(self) -> dict[str, Any]:
        """The options ``make_learner(self.name, ...)`` accepts (others are left out)."""
        from .learners import learner_options

        accepted = learner_options(self.name)
        fields = [f for f in dataclasses.fields(self) if f.name != "name"]
        for f in fields:  # an option set away from its default that this learner does not take
            if f.name in _SPECIFIC and f.name not in accepted and getattr(self, f.name) != f.default:
                fail(f"learner.{f.name}", f"does not apply to learner {self.name!r} (its options: "
                     f"{', '.join(sorted(k for k in accepted if k not in ('net', 'optimizer')))})")
        mine = {f.name: getattr(self, f.name) for f in fields}
        return {k: v for k, v in mine.items() if k in accepted and v is not None}


# learner options only some learners take: setting one for another learner is an error
_SPECIFIC = ("incremental", "rescale", "state_optimizer", "tol", "armijo_steps", "prior", "schedule", "beta", "estimator", "equilibration")


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd", "mq"] = "adamw"
    """Weight optimizer: adamw, adam, sgd or mq (fastpc.optim.MQ; lr is its α; ρ cap as the paper's)."""
    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for adamw)."""
    momentum: float = 0.9
    """sgd momentum, in [0, 1)."""
    nesterov: bool = False
    """sgd Nesterov momentum (needs momentum > 0)."""
    schedule: Literal["none", "cosine", "warmup_cosine"] = "cosine"
    """Per-step learning-rate schedule: none, cosine, or warmup_cosine (linear warm-up, then cosine)."""
    warmup: float = 0.0
    """warmup_cosine: fraction of all training steps spent warming up, in (0, 1)."""
    min_lr_ratio: float = 0.0
    """cosine schedules decay to lr × min_lr_ratio, in [0, 1]."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            fail("optim.lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            fail("optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            fail("optim.momentum", f"must be in [0, 1), got {self.momentum}")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            fail("optim.nesterov", "needs optim.name=sgd and optim.momentum > 0")
        if self.schedule == "warmup_cosine" and not 0.0 < self.warmup < 1.0:
            fail("optim.warmup", f"must be in (0, 1) with schedule warmup_cosine, got {self.warmup}")
        if self.schedule != "warmup_cosine" and self.warmup != 0:
            fail("optim.warmup", f"is only used by schedule warmup_cosine (schedule is {self.schedule})")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    epochs: int = 1
    """Passes over the training split."""
    seed: int = 0
    """Seeds torch, numpy, python and the data order; a fixed seed reproduces bit for bit on CPU."""
    device: str = "cpu"
    """cpu, cuda, cuda:N, mps, or auto (cuda when available; under torchrun cuda:LOCAL_RANK, one GPU
    per process, and the CPU with gloo where there is none)."""
    out: str | None = None
    """Run folder; null = runs/<date>-<time>-<learner>-<arch>."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameter and data precision."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Products of the block forwards: fp32, or bf16 (torch.autocast of the forward matmuls/convs and
    the products inference and the update take from them, on CPU and CUDA; states, energies,
    gradients and weights stay float32; needs dtype float32; runs eagerly; see fastpc.precision)."""
    checkpoint_every: int = 1
    """Write checkpoints/last.pt every this many epochs (and always after the last); 0 = only at the end."""
    max_energy: float = 1.0e6
    """Stop as diverged when a step's loss or energy per example is not finite or exceeds this."""
    progress: bool = True
    """Show a tqdm progress bar per epoch."""
    threads: int | Literal["auto"] | None = "auto"
    """CPU threads for torch (``torch.set_num_threads``): a number; auto = the cores other work
    does not already keep busy (1-minute load average) — running several experiments at once,
    give each ``threads: 1``; null = torch's default (every core)."""
    flush_denormal: bool = True
    """Flush subnormal floats to zero on the CPU while training (they slow products 10-100×;
    results change by less than the smallest normal float)."""
    tensorboard: bool = False
    """Also write each epoch's metrics (metrics.csv's columns, step = epoch) as TensorBoard event
    files into <run>/tensorboard/ (needs ``pip install fastpc[tensorboard]``)."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            fail("train.epochs", f"must be >= 1, got {self.epochs}")
        if self.out is not None and not self.out.strip():
            fail("train.out", "must be a folder path or null (a new folder under runs/), got an empty string")
        if not 0 <= self.seed < 2**63:
            fail("train.seed", f"must be in [0, 2**63), got {self.seed}")
        dev = self.device.split(":")
        if dev[0] not in ("cpu", "cuda", "mps", "auto") or len(dev) > 2 or (len(dev) == 2 and not dev[1].isdigit()):
            fail("train.device", f"must be cpu, cuda, cuda:N, mps or auto, got {self.device!r}")
        if self.checkpoint_every < 0:
            fail("train.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        if not self.max_energy > 0:
            fail("train.max_energy", f"must be > 0, got {self.max_energy}")
        if self.precision == "bf16" and self.dtype != "float32":
            fail("train.precision", f"bf16 autocasts a float32 net's products; needs train.dtype float32, got {self.dtype}")
        if self.threads not in (None, "auto") and not 1 <= self.threads <= 1024:
            fail("train.threads", f"must be in [1, 1024] or null, got {self.threads}")


@dataclass
class Config:
    """A full run: data, model, learner, weight optimizer, training loop."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def choice(key: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        fail(key, f"unknown value {value!r}{hint}; expected one of {', '.join(choices)}")
