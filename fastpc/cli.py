"""``fastpc`` command line: argument parsing and dispatch only (no algorithm code).

    fastpc train [CONFIG] [--set key=value ...] [--resume RUN] [--overwrite]
    fastpc eval RUN [--checkpoint PATH] [--set key=value ...]
    fastpc report RUN
    fastpc bench SUITE [suite options]

Bad input prints one line ``error: <what was wrong and what is accepted>`` on stderr and
exits with status 2; an interrupt exits with 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .errors import UserError
from .presets import list_presets, preset_path


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one-line UserErrors."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def _config_path(name: str) -> Path:
    """A YAML path, or the name of a preset in fastpc/presets/ (``cifar10-vgg5-epc``)."""
    path = Path(name)
    if path.is_file() or path.suffix in (".yaml", ".yml") or "/" in name:
        return path
    preset = preset_path(name)
    if preset is not None:
        return preset
    known = ", ".join(list_presets()) or "none"
    raise UserError(f"config {name!r} is neither a file nor a preset; presets: {known}")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .distributed import is_main
    from .runfiles import format_test
    from .train import fit

    if args.resume is not None:
        if args.config is not None:
            raise UserError("give either CONFIG or --resume RUN, not both (a resumed run uses RUN/config.yaml)")
        if args.overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise UserError(f"cannot resume {run}: not a fastpc run folder (no config.yaml)")
        cfg = load_config(run / "config.yaml", [*args.set, f"train.out={json.dumps(str(run))}"], stored=True)
        summary = fit(cfg, resume=True)
    else:
        cfg = load_config(_config_path(args.config) if args.config else None, args.set)
        summary = fit(cfg, overwrite=args.overwrite)
    if not is_main():  # data parallel (torchrun): rank 0 reports
        return 0
    data = summary.data
    head = format_test(cfg.model.mode == "generative", summary.test_loss, summary.test_acc)
    print(f"{head}  training seconds per epoch "
          f"{', '.join(f'{s:.1f}' for s in summary.epoch_seconds)}  run {summary.run_dir}  "
          f"data {data['name']} from {data['path']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .report import evaluate_run

    res = evaluate_run(args.run, checkpoint=args.checkpoint, overrides=args.set)
    print(json.dumps(res, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    print(report(args.run, diagnostics=not args.no_diagnostics))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastpc", description="Train predictive coding networks.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a model; no CONFIG runs the built-in quickstart")
    t.add_argument("config", nargs="?", help="YAML file or preset name (default: quickstart); presets: "
                   + ", ".join(list_presets()))
    t.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set learner.iters=10 optim.lr=3e-4")
    t.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run's checkpoint on val/test")
    e.add_argument("run", metavar="RUN")
    e.add_argument("--checkpoint", help="checkpoint file (default RUN/checkpoints/last.pt)")
    e.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys (e.g. data.root, train.device)")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="summarise a run, redraw its plots, write its diagnostics")
    r.add_argument("run", metavar="RUN")
    r.add_argument("--no-diagnostics", action="store_true",
                   help="skip the diagnostics (energy heatmaps, alignment with BP, iterations vs depth)")
    r.set_defaults(func=cmd_report)

    from .bench import SUITES  # names only; a suite module is imported when it runs

    b = sub.add_parser("bench", help="run a benchmark suite (results under benchmarks/results/)")
    suites = b.add_subparsers(dest="suite", metavar="SUITE", parser_class=_Parser)
    suites.required = True
    for name in SUITES:
        s = suites.add_parser(name, add_help=False, help=f"the {name} suite (fastpc bench {name} --help)")
        s.add_argument("suite_args", nargs=argparse.REMAINDER)  # parsed by the suite (see main)
    b.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import get_suite

    try:
        suite = get_suite(args.suite)
    except ImportError as e:
        raise UserError(f"bench suite {args.suite!r} is not available ({e})") from None
    p = _Parser(prog=f"fastpc bench {args.suite}", description=suite.__doc__)
    suite.add_arguments(p)
    suite_args = p.parse_args(args.suite_args)
    suite_args.argv = list(args.suite_args)  # recorded with the results as the exact command
    return int(suite.run(suite_args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastpc`` command; returns the exit status."""
    from .bench import SUITES

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if len(argv) >= 2 and argv[0] == "bench" and argv[1] in SUITES:
            # the suite parses its own options (argparse cannot forward "--opt" reliably)
            return cmd_bench(argparse.Namespace(suite=argv[1], suite_args=argv[2:]))
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"error: {_interrupted(e, argv[:1] == ['train'])}", file=sys.stderr)
        return 130


def _interrupted(e: KeyboardInterrupt, training: bool) -> str:
    """What an interrupt leaves: a run to resume (fit names it when it has a checkpoint) or none."""
    run = getattr(e, "run_dir", None)
    if run is not None:
        return f"interrupted; continue with: fastpc train --resume {shlex.quote(str(run))}"
    if training:
        return "interrupted before the run's first checkpoint; nothing to resume, run the same command again"
    return "interrupted"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
