"""``robustbench-kd``: methods, distill, evaluate, merge-shards, compare, reproduce, report, quickstart.

Only argparse is imported at module level so ``--help`` and ``methods`` start fast (no robustbench,
timm or scikit-learn). A :class:`UserError` prints one line and exits 2; ``--debug`` shows tracebacks.
A command line argparse refuses (a missing argument, ``--epochs ten``) is one line and exit 2 too, and
every number and output directory given on the command line is checked before the command starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import typing
from pathlib import Path

ATTACK_CHOICES = "clean, fgsm, pgd, cw, autoattack, autoattack-quick"


class _UsageError(Exception):
    """A command line argparse refused; :func:`main` prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse's own print the usage first); subcommands inherit it."""

    def error(self, message: str) -> typing.NoReturn:
        raise _UsageError(f"{' '.join(message.split())} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="robustbench-kd",
        description="Distil adversarial robustness from RobustBench model-zoo teachers into students, "
        "and evaluate them the way the RobustBench leaderboard does.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("methods", help="list registered methods with their plugin, distribution and paper")
    p.add_argument(
        "--options", metavar="METHOD", help="show one method's options: type, default and help (set them in [method])"
    )

    p = sub.add_parser("distill", help="train a student from teachers (config file + overrides)")
    p.add_argument("config", help="run file (.toml, .yaml)")
    _add_run_overrides(p)
    p.add_argument(
        "--resume-changed",
        action="append",
        default=[],
        metavar="KEY[,KEY]",
        help="with --resume: let the config differ from what last.pt was trained with in these keys or "
        "sections (e.g. threat.eps, method.beta, teachers.robust, data); without it such a resume is refused, "
        "listing the differing keys (repeatable)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument(
        "--seeds",
        metavar="LIST",
        help="run the configuration once per training seed, e.g. 0,1,2 or 0-4: one run directory per seed "
        "under run.out_dir (seed_<s>, model id <run.name>_seed<s>), finished seeds not rerun, an interrupted "
        "one resumed; then aggregate.md/.json there: mean, std and 95%% interval of every accuracy",
    )

    p = sub.add_parser("evaluate", help="leaderboard-style evaluation of a checkpoint or zoo model")
    p.add_argument("model", help="file:PATH[?arch=NAME], PATH, or robustbench:<dataset>/<threat>/<Name>")
    p.add_argument("--dataset", default="cifar10", help="digits, cifar10, cifar100, imagenet (default cifar10)")
    p.add_argument("--data-dir", default="./data")
    p.add_argument(
        "--preprocessing",
        default=None,
        help="imagenet: Res256Crop224, BicubicRes256Crop224, Res224 or Crop288 (default: the zoo "
        "entry's for robustbench: models, else Res256Crop224)",
    )
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--no-verify-md5", action="store_true", help="accept CIFAR files without checking MD5")
    p.add_argument("--threat", default="Linf", choices=["Linf", "L2"])
    p.add_argument(
        "--eps", default=None, help="radius; default 8/255 (Linf) / 0.5 (L2), 4/255 for imagenet Linf, 0.2 for digits"
    )
    p.add_argument("--attacks", default="clean,pgd,autoattack", help=f"comma list of: {ATTACK_CHOICES}")
    p.add_argument(
        "--n-examples",
        type=int,
        default=None,
        help="first N test examples, unshuffled (default: all, the leaderboard protocol)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--name",
        default=None,
        help="model id: writes model_info/, models/, results/ and the submission bundle submission/<ID>/ under --out",
    )
    meta = p.add_argument_group("leaderboard metadata (model_info JSON and submission bundle; with --name)")
    meta.add_argument("--title", default=None, help="paper title (the entry's 'name' field)")
    meta.add_argument("--authors", default=None, help="paper authors, e.g. 'A. Author, B. Author'")
    meta.add_argument("--venue", default=None, help="e.g. 'ICML 2024' or 'arXiv, Jun 2024'")
    meta.add_argument("--link", default=None, help="paper URL")
    meta.add_argument(
        "--architecture",
        default=None,
        help="architecture name, e.g. WideResNet-34-10 (default: derived from the model)",
    )
    meta.add_argument(
        "--additional-data", action="store_true", help="training used data beyond the dataset's training set"
    )
    meta.add_argument(
        "--number-forward-passes",
        type=int,
        default=1,
        metavar="N",
        help="forward passes per prediction, for the leaderboard entry (default 1)",
    )
    meta.add_argument("--reported", default=None, help="robust accuracy claimed in the paper, in percent")
    p.add_argument("--out", default=".", help="output directory (default: current directory)")
    p.add_argument("--model-dir", default="./models", help="RobustBench model directory")
    p.add_argument("--allow-download", action="store_true", help="let robustbench download zoo weights")
    p.add_argument(
        "--no-sanity",
        action="store_true",
        help="skip the evaluation sanity suite (eps sweep, unbounded eps, determinism, AA flags)",
    )
    p.add_argument(
        "--teacher",
        default=None,
        metavar="SPEC",
        help="a model (same spec forms) whose PGD adversarials are transferred to the evaluated "
        "model: a sanity check for gradient masking",
    )
    # Sharded and resumable evaluation: robustbench_kd.evaluation.shards
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="evaluate only shard I of N (0-based, contiguous slices) and write "
        "<out>/shards/<name>/shard_I_of_N.json; needs --name; merge with merge-shards",
    )
    p.add_argument(
        "--aa-state",
        default=None,
        metavar="PATH",
        help="AutoAttack state file: an interrupted run given the same file resumes where it "
        "stopped (default with --shard: <out>/shards/<name>/aa_state_I_of_N.json)",
    )

    p = sub.add_parser("merge-shards", help="merge the shard files of `evaluate --shard` into the results")
    p.add_argument("directory", help="<out>/shards/<name>, holding shard_<i>_of_<n>.json")
    p.add_argument("--out", default=None, help="output directory (default: the shard runs' --out)")

    p = sub.add_parser(
        "compare",
        help="which differences between runs are real: accuracies with 95%% intervals and a paired test "
        "of every pair on the per-point results",
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="RUN_OR_SWEEP",
        help="a run directory, a `distill --seeds` sweep directory, results/<id>.json or "
        "results/<id>.points.safetensors; all evaluated on the same points with the same eps and attacks",
    )
    p.add_argument(
        "--metric", default="autoattack", help="outcome the pairs are tested on (default autoattack; clean, pgd-20...)"
    )
    p.add_argument("--out", default=None, help="also write comparison.md, .html (with the figure), .png and .json")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")

    p = sub.add_parser(
        "reproduce",
        help="a paper's recipe (examples/recipes/): distill, leaderboard evaluation, and the result "
        "against the published numbers",
    )
    p.add_argument("recipe", help="a recipe run file, e.g. examples/recipes/cifar10_rslad_resnet18.toml")
    _add_run_overrides(p)

    p = sub.add_parser(
        "check-submission",
        help="check a submission bundle as a RobustBench maintainer would; exit 0 only for a ready bundle",
    )
    p.add_argument("directory", help="<out>/submission/<ID> (or <ID>.preview)")
    p.add_argument(
        "--no-load", action="store_true", help="skip loading the zoo entry in a separate process without robustbench_kd"
    )

    p = sub.add_parser(
        "report",
        help="report of a finished run (report.html, report.md, overview.png, figures); "
        "several runs: a comparison report",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run.out_dir of a distill run")
    p.add_argument(
        "--out", default=None, help="output directory (default: RUN_DIR/report for one run, ./comparison for several)"
    )

    p = sub.add_parser("quickstart", help="offline demo: robust teacher -> distilled student -> AutoAttack")
    p.add_argument("--out", default="quickstart-out", help="output directory (default quickstart-out)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    return parser


def _add_run_overrides(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable) and ``--resume``: what `distill` and `reproduce` take besides the run file."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=0.1 --set threat.eps=8/255 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue from <run.out_dir>/checkpoints/last.pt")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"robustbench-kd: error: {exc}", file=sys.stderr)
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the submission bundle
    if args.command is None:
        parser.print_help()
        return 0
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s")
    from robustbench_kd.errors import UserError

    try:
        return _COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"robustbench-kd: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The machine, not the input: a full disk, a lost mount, permissions. Every checkpoint and result
        # is written atomically, so the previous files are intact and `--resume` continues from them.
        if args.debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"robustbench-kd: error: cannot read or write{where}: {exc.strerror or exc}; files written before "
            "are intact (atomic writes) - fix the cause and rerun (distill: add --resume)",
            file=sys.stderr,
        )
        return 1
    except (Exception, SystemExit) as exc:
        # A crash (or sys.exit) in a third-party plugin: one line naming the plugin, its distribution, the function.
        # A crash in this project's own code keeps its traceback (a bug report needs it).
        from robustbench_kd.plugin_host import plugin_failure

        message = plugin_failure(exc)
        if message is None or args.debug:
            raise
        print(f"robustbench-kd: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "evaluate":
            # AutoAttack's state file (--aa-state, or a shard's own) has kept every finished batch.
            resumable = args.aa_state is not None or args.shard is not None
            print(
                "robustbench-kd: interrupted"
                + ("; run the same command again to resume AutoAttack" if resumable else ""),
                file=sys.stderr,
            )
            return 130
        print("robustbench-kd: interrupted; the last completed epoch is in checkpoints/last.pt", file=sys.stderr)
        return 130


def _cmd_methods(args: argparse.Namespace) -> int:
    from robustbench_kd.distiller import citation_of
    from robustbench_kd.plugin_host import PluginHost

    host = PluginHost.create()
    methods = host.methods
    if args.options:
        _print_options(methods.get(args.options))
        return 0
    rows = [
        (e.name, e.plugin, host.distribution_of(e.plugin), ",".join(e.value.teacher_roles) or "-", citation_of(e.value))
        for e in methods.entries()
    ]
    header = ("method", "plugin", "distribution", "teachers", "paper")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=False)) + "  " + row[4])
    return 0


def _print_options(cls) -> None:
    from robustbench_kd.distiller import describe_options
    from robustbench_kd.plugin_host import PluginHost

    host = PluginHost.create()  # the registry entry names the plugin that registered the class
    entry = next((e for e in host.methods.entries() if e.value is cls), None)
    source = f"plugin {entry.plugin}, {host.distribution_of(entry.plugin)}" if entry is not None else ""
    for line in describe_options(cls, source):
        print(line)


def _cmd_distill(args: argparse.Namespace) -> int:
    from robustbench_kd.config import load_config

    # The run file is read and checked before torch is imported: a bad value fails at once.
    config = load_config(args.config, args.overrides)
    if args.seeds is not None:
        return _distill_seeds(args, config)
    from robustbench_kd.api import distill
    from robustbench_kd.evaluation.final_report import format_table
    from robustbench_kd.scale import distributed

    distributed.quiet_other_ranks()  # under torchrun: one log, from rank 0
    try:
        result = distill(config, resume=args.resume, evaluate=not args.no_eval, resume_changed=args.resume_changed)
    finally:
        distributed.shutdown()
    if result.reports:
        print(format_table(result.reports))
        _print_outputs(result.reports)
    if distributed.is_main():
        print(f"run directory: {config.run.out_dir}")
    return 0


def _distill_seeds(args: argparse.Namespace, config) -> int:
    from robustbench_kd.errors import UserError

    for flag, given in (
        ("--resume", args.resume),
        ("--no-eval", args.no_eval),
        ("--resume-changed", args.resume_changed),
    ):
        if given:
            why = "resumes unfinished seeds by itself" if flag != "--no-eval" else "aggregates the final evaluations"
            raise UserError(f"--seeds {why}; drop {flag}")
    from robustbench_kd.api.sweep import distill_seeds, parse_seeds

    seeds = parse_seeds(args.seeds)
    result = distill_seeds(args.config, seeds, overrides=args.overrides)
    print(result.paths["aggregate_md"].read_text(encoding="utf-8").rstrip())
    for run in result.runs:
        print(f"seed {run.seed}: {run.status}, {run.run_dir}")
    print(f"sweep directory: {result.sweep_dir}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from robustbench_kd.api.compare import compare

    comparison = compare(args.sources, metric=args.metric, out=args.out, n_resamples=args.resamples)
    print(comparison.markdown().rstrip())
    if args.out is not None:
        print(f"wrote {Path(args.out) / 'comparison.html'} (and .md, .png, .json)")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from robustbench_kd.api.reproduce import reproduce
    from robustbench_kd.evaluation.final_report import format_table

    outcome = reproduce(args.recipe, overrides=args.overrides, resume=args.resume)
    if outcome.result.reports:
        print(format_table(outcome.result.reports))
        _print_outputs(outcome.result.reports)
    print(outcome.verdict)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import shlex

    from robustbench_kd.api import evaluate
    from robustbench_kd.api.evaluation import default_eps
    from robustbench_kd.evaluation.final_report import format_table
    from robustbench_kd.submission.section import ModelInfoSection
    from robustbench_kd.threat import parse_number, validate_eps

    _check_evaluate_args(args)
    # The flag is checked here so that its error names --eps; the default is the API's (the leaderboard's).
    eps = default_eps(args.dataset, args.threat) if args.eps is None else parse_number(args.eps, what="--eps")
    validate_eps(eps, args.threat, what="--eps")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    result = evaluate(
        args.model,
        dataset=args.dataset,
        threat_model=args.threat,
        eps=eps,
        n_examples=args.n_examples,
        attacks=attacks,
        data_dir=args.data_dir,
        device=args.device,
        batch_size=args.batch_size,
        seed=args.seed,
        name=args.name,
        out_dir=args.out,  # a string: an empty --out is refused, not read as "."
        preprocessing=args.preprocessing,
        aa_state_path=args.aa_state,
        pgd_steps=args.pgd_steps,
        sanity=not args.no_sanity,
        teacher=args.teacher,
        model_dir=args.model_dir,
        allow_download=args.allow_download,
        download=args.download,
        verify_md5=not args.no_verify_md5,
        model_info=ModelInfoSection(
            title=args.title,
            authors=args.authors,
            venue=args.venue,
            link=args.link,
            architecture=args.architecture,
            additional_data=True if args.additional_data else None,
            reported=args.reported,
            number_forward_passes=args.number_forward_passes,
        ),
        shard=args.shard,
        command=shlex.join(["robustbench-kd", *args.argv]),
    )
    report = result.report
    assert report is not None  # evaluate() always keeps its report
    print(format_table([report]))
    _print_outputs([report])
    return 0


def _check_evaluate_args(args: argparse.Namespace) -> None:
    """The numbers and paths of ``evaluate``, checked before anything is loaded or written."""
    from robustbench_kd.errors import UserError
    from robustbench_kd.evaluation.shards import parse_shard
    from robustbench_kd.storage.names import check_output_dir
    from robustbench_kd.threat import COUNT_MAX, check_int, check_seed

    if args.n_examples is not None:
        check_int(args.n_examples, what="--n-examples", low=1)
    check_int(args.batch_size, what="--batch-size", low=1)
    check_int(args.pgd_steps, what="--pgd-steps", low=1)
    check_seed(args.seed, what="--seed")
    check_int(args.number_forward_passes, what="--number-forward-passes", low=1, high=1000)
    for flag, value in (("--out", args.out), ("--data-dir", args.data_dir), ("--model-dir", args.model_dir)):
        check_output_dir(value, what=flag)
    if args.aa_state is not None and not args.aa_state.strip():
        raise UserError("--aa-state is empty; give the path of the AutoAttack state file")
    if args.shard is not None:
        check_int(parse_shard(args.shard)[1], what="--shard's N (the number of shards)", low=1, high=COUNT_MAX)


def _check_out(args: argparse.Namespace) -> None:
    """``--out`` of merge-shards, report and quickstart: a usable directory when given."""
    from robustbench_kd.storage.names import check_output_dir

    if args.out is not None:
        check_output_dir(args.out, what="--out")


def _cmd_merge_shards(args: argparse.Namespace) -> int:
    from robustbench_kd.evaluation.final_report import format_table
    from robustbench_kd.evaluation.shards import merge_and_write
    from robustbench_kd.plugin_host import PluginHost

    _check_out(args)
    report = merge_and_write(Path(args.directory), args.out, host=PluginHost.create())
    print(format_table([report]))
    _print_outputs([report])
    return 0


def _cmd_check_submission(args: argparse.Namespace) -> int:
    from robustbench_kd.jobs.check_submission import check_submission

    check = check_submission(Path(args.directory), load_entry=not args.no_load)
    print("\n".join(check.lines()))
    return 0 if check.ready else 1


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from robustbench_kd.evaluation.final_report import format_table
    from robustbench_kd.jobs.quickstart import run_quickstart
    from robustbench_kd.threat import check_int, check_seed

    _check_out(args)
    check_int(args.epochs, what="--epochs", low=1)
    check_seed(args.seed, what="--seed")
    start = time.perf_counter()
    reports = run_quickstart(args.out, epochs=args.epochs, seed=args.seed)
    print()
    print(format_table(reports))
    student = reports[-1].accuracy
    aa, clean = student.get("autoattack"), student.get("clean")
    if aa is not None and clean is not None:
        verdict = "yes" if 0 < aa < clean else "NO"
        print(
            f"\nstudent AutoAttack accuracy {100 * aa:.2f}% is above zero and below its clean accuracy "
            f"{100 * clean:.2f}%: {verdict}"
        )
    _print_outputs(reports)
    print(f"quickstart finished in {time.perf_counter() - start:.0f} s; outputs under {Path(args.out).resolve()}")
    return 0


def _print_outputs(reports) -> None:
    for rep in reports:
        sanity = getattr(rep, "sanity", None)  # the evaluation sanity suite's verdict
        if sanity is not None and not sanity.reliable:
            print(f"UNRELIABLE evaluation of {rep.label}: " + "; ".join(sanity.reasons))
        for path in (rep.model_info_path, rep.checkpoint_path, rep.results_path, getattr(rep, "points_path", None)):
            if path is not None:
                print(f"wrote {path}")
        if getattr(rep, "bundle_status", None):
            print(f"wrote {rep.bundle_status}")


def _cmd_report(args: argparse.Namespace) -> int:
    _check_out(args)
    if len(args.run_dirs) == 1:
        from robustbench_kd.analysis.reports.run_report import write_run_report
        from robustbench_kd.jobs.pipeline import load_finished_run

        run_dir = Path(args.run_dirs[0])
        path = write_run_report(load_finished_run(run_dir), out_dir=args.out)
    else:
        from robustbench_kd.analysis.reports.compare import write_comparison_report

        path = write_comparison_report([Path(d) for d in args.run_dirs], "comparison" if args.out is None else args.out)
    print(f"report: {path}")
    return 0


_COMMANDS = {
    "methods": _cmd_methods,
    "distill": _cmd_distill,
    "evaluate": _cmd_evaluate,
    "merge-shards": _cmd_merge_shards,
    "compare": _cmd_compare,
    "reproduce": _cmd_reproduce,
    "check-submission": _cmd_check_submission,
    "report": _cmd_report,
    "quickstart": _cmd_quickstart,
}

if __name__ == "__main__":
    raise SystemExit(main())
