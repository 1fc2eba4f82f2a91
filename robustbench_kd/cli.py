"""``robustbench-kd``: methods, distill, evaluate, quickstart.

Only argparse is imported at module level so ``--help`` and ``methods`` start fast (no robustbench,
timm or scikit-learn). A :class:`UserError` prints one line and exits 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ATTACK_CHOICES = "clean, fgsm, pgd, cw, autoattack, autoattack-quick"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustbench-kd",
        description="Distil adversarial robustness from RobustBench model-zoo teachers into students, "
                    "and evaluate them the way the RobustBench leaderboard does.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("methods", help="list registered methods with their plugin, distribution and paper")
    p.add_argument("--options", metavar="METHOD", help="show one method's options and defaults")

    p = sub.add_parser("distill", help="train a student from teachers (config file + overrides)")
    p.add_argument("config", help="run file (.toml, .yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.1 --set threat.eps=8/255 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from <run.out_dir>/checkpoints/last.pt")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")

    p = sub.add_parser("evaluate", help="leaderboard-style evaluation of a checkpoint or zoo model")
    p.add_argument("model", help="file:PATH[?arch=NAME], PATH, or robustbench:<dataset>/<threat>/<Name>")
    p.add_argument("--dataset", default="cifar10", help="digits, cifar10, cifar100 (default cifar10)")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--no-verify-md5", action="store_true", help="accept CIFAR files without checking MD5")
    p.add_argument("--threat", default="Linf", choices=["Linf", "L2"])
    p.add_argument("--eps", default=None, help="radius; default 8/255 (Linf) / 0.5 (L2), 0.2 for digits")
    p.add_argument("--attacks", default="clean,pgd,autoattack", help=f"comma list of: {ATTACK_CHOICES}")
    p.add_argument("--n-examples", type=int, default=None,
                   help="first N test examples, unshuffled (default: all, the leaderboard protocol)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default=None, help="model id: writes model_info/ and models/ under --out")
    p.add_argument("--out", default=".", help="output directory (default: current directory)")
    p.add_argument("--model-dir", default="./models", help="RobustBench model directory")
    p.add_argument("--allow-download", action="store_true", help="let robustbench download zoo weights")

    p = sub.add_parser("quickstart", help="offline demo: robust teacher -> distilled student -> AutoAttack")
    p.add_argument("--out", default="quickstart-out", help="output directory (default quickstart-out)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s")
    from .errors import UserError

    try:
        return _COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"robustbench-kd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustbench-kd: interrupted; the last completed epoch is in checkpoints/last.pt", file=sys.stderr)
        return 130


def _cmd_methods(args: argparse.Namespace) -> int:
    from .distiller import citation_of
    from .plugin_host import PluginHost

    host = PluginHost.create()
    methods = host.methods
    if args.options:
        _print_options(methods.get(args.options))
        return 0
    rows = [(e.name, e.plugin, host.distribution_of(e.plugin), ",".join(e.value.teacher_roles) or "-",
             citation_of(e.value)) for e in methods.entries()]
    header = ("method", "plugin", "distribution", "teachers", "paper")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    return 0


def _print_options(cls) -> None:
    import dataclasses

    print(f"{cls.name}: {cls.__name__} - {cls.paper}")
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        print(f"  method.{f.name} = {default!r}")


def _cmd_distill(args: argparse.Namespace) -> int:
    from .config import load_config
    from .pipeline import distill
    from .report import format_table

    config = load_config(args.config, args.overrides)
    reports = distill(config, resume=args.resume, final_eval=not args.no_eval)
    if reports:
        print(format_table(reports))
        _print_outputs(reports)
    print(f"run directory: {config.run.out_dir}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .pipeline import evaluate_spec
    from .report import format_table
    from .threat import parse_number, validate_eps

    if args.eps is None:
        eps = 0.2 if args.dataset == "digits" else (8 / 255 if args.threat == "Linf" else 0.5)
    else:
        eps = parse_number(args.eps, what="--eps")
    validate_eps(eps, args.threat, what="--eps")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    report = evaluate_spec(args.model, dataset=args.dataset, data_dir=args.data_dir, norm=args.threat, eps=eps,
                           attacks=attacks, n_examples=args.n_examples, batch_size=args.batch_size, seed=args.seed,
                           pgd_steps=args.pgd_steps, out_dir=Path(args.out), model_id=args.name,
                           model_dir=args.model_dir, allow_download=args.allow_download, download=args.download,
                           verify_md5=not args.no_verify_md5, device=args.device)
    print(format_table([report]))
    _print_outputs([report])
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart
    from .report import format_table

    start = time.perf_counter()
    reports = run_quickstart(args.out, epochs=args.epochs, seed=args.seed)
    print()
    print(format_table(reports))
    student = reports[-1].accuracy
    aa, clean = student.get("autoattack"), student.get("clean")
    if aa is not None and clean is not None:
        verdict = "yes" if 0 < aa < clean else "NO"
        print(f"\nstudent AutoAttack accuracy {100 * aa:.2f}% is above zero and below its clean accuracy "
              f"{100 * clean:.2f}%: {verdict}")
    _print_outputs(reports)
    print(f"quickstart finished in {time.perf_counter() - start:.0f} s; outputs under {Path(args.out).resolve()}")
    return 0


def _print_outputs(reports) -> None:
    for rep in reports:
        for path in (rep.model_info_path, rep.checkpoint_path, rep.results_path):
            if path is not None:
                print(f"wrote {path}")


_COMMANDS = {"methods": _cmd_methods, "distill": _cmd_distill, "evaluate": _cmd_evaluate,
             "quickstart": _cmd_quickstart}

if __name__ == "__main__":
    raise SystemExit(main())
