"""The ``nnsim`` command line.

    nnsim audit --out DIR                 # the embedded default: digits, planted noise, a CNN
    nnsim audit --data PATH --model SPEC --out DIR   # ImageFolder, folder of files, list.csv, datalist.json,
                                                     # a Hugging Face dataset folder, shards-{000..003}.tar

Exit codes: 0 done, 1 an error (the message says what and how to fix it), 2 bad
arguments, 130 interrupted (run the same command again to resume). An error is one line
(no Python traceback); ``--debug`` prints the traceback as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import index_commands as index_cli
from ..errors import CliError, InputError, NnsimError

logger = logging.getLogger(__name__)


def _thresholds(items: Optional[List[str]], args=None) -> Optional[Dict[str, Any]]:
    """The thresholds of ``--threshold NAME=VALUE`` and of the checks' own flags (None: defaults)."""
    from ..audit.checks import CHECKS

    out: Dict[str, Any] = {}
    for check in CHECKS if args is not None else ():
        out.update(check.thresholds_from_cli(args))
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--threshold {item!r}: expected NAME=VALUE, e.g. --threshold label_issue=0.6")
        if not value.strip():
            raise CliError(f"--threshold {item!r}: no value after '='; write NAME=VALUE (a number), or NAME=none for "
                           "a threshold that can be turned off")
        try:
            number = None if value.strip().lower() == "none" else float(value)
        except ValueError as exc:
            raise CliError(f"--threshold {item!r}: {value!r} is not a number") from exc
        if name.strip() in out and out[name.strip()] != number:
            raise CliError(f"--threshold {item!r} contradicts {name.strip()}={out[name.strip()]} given by another flag; "
                           "give it once")
        out[name.strip()] = number
    if not out:
        return None
    from ..audit.thresholds import Thresholds

    Thresholds.make(out)  # fail now, not after training
    return out


def _add_audit(sub) -> None:
    """``nnsim audit``: the embedded demo, or your data and model."""
    from ..audit.checks import CHECKS
    from ..audit.demo import DEFAULT_EPOCHS, DEFAULT_NOISE
    from ..audit.output_choice import DEFAULT_K, DEFAULT_SKETCH_DIM

    a = sub.add_parser(
        "audit",
        help="audit a labelled dataset (label errors, near-duplicates, outliers, denoising)",
        description="Audit a labelled dataset through a trained network's own similarity. Without --data, runs the "
        "embedded default: scikit-learn's digits with planted label noise and a small CNN trained on the fly.",
    )
    a.set_defaults(run=cmd_audit)
    a.add_argument("--out", default="nnsim-audit", help="output folder (default: %(default)s)")
    a.add_argument("--overwrite", action="store_true", help="replace a finished audit in --out")
    data = a.add_argument_group("your data (all optional: without --data the demo runs)")
    data.add_argument("--data", help=_data_help())
    data.add_argument("--classes", default=None, metavar="NAME,NAME,...",
                      help="class names in index order (comma-separated): CSV/datalist labels may then be these "
                      "names or integer indices; ImageFolder folders get these indices")
    data.add_argument("--image-column", default=None, metavar="NAME",
                      help="Hugging Face datasets: the image column; WebDataset: the image member's extension "
                      "(png, jpg, npy). Default: the one image column or member")
    data.add_argument("--label-column", default=None, metavar="NAME",
                      help="Hugging Face datasets: the label column; WebDataset: the label member (default: the "
                      "ClassLabel column, label, or cls; none: unlabelled)")
    data.add_argument("--split", default=None, help="Hugging Face DatasetDict: the split to audit (default: train)")
    data.add_argument("--id-column", default=None, metavar="NAME",
                      help="Hugging Face datasets: the column that names each sample in the table (default: a "
                      "path/file_name/id column of distinct values, else the row index)")
    data.add_argument("--model", help="timm:NAME, torchvision:NAME, monai:NAME or package.module:function")
    data.add_argument("--model-kwargs", default=None, help="JSON object of keyword arguments for the model")
    data.add_argument("--checkpoint", help="trained weights to load (a state_dict file)")
    data.add_argument("--train", type=int, default=None, metavar="EPOCHS",
                      help="no trained model? fit --model on --data for EPOCHS epochs first (AdamW, lr 1e-3 with a cosine decay; from "
                      "--checkpoint's weights when given), save it in OUT/trained/model.pt, then audit with it")
    data.add_argument("--folds", type=_folds, default=None, metavar="K",
                      help="with --train: also train K models, each blind to one K-th of the data, and look at every "
                      "sample through the model that never saw it, so that memorised wrong labels still stand out "
                      "(default: auto, 5 or the smallest class's size; 2 is faster; 0 turns it off: one model)")
    data.add_argument("--augment", default=None, metavar="TRANSFORMS",
                      help="with --train: label-keeping transforms while training, comma-separated: flip (left-right), "
                      "shift (up to 1/8 of the size), channels (shuffle colours); helps models trained from scratch "
                      "on little data learn the classes instead of the labels (default: none)")
    data.add_argument("--neighbor-layers", default=None, metavar="first-half or NAMES",
                      help="the layers whose gradients give the neighbours (label issues, duplicates, rare samples): "
                      "first-half (the first half of the model's layers: when the model has memorised its labels), or "
                      "comma-separated module names or glob patterns (default: every layer; density and denoising "
                      "always use every layer)")
    data.add_argument("--num-classes", type=int, help="number of classes of the model's head")
    data.add_argument("--image-size", default=None, metavar="N or H,W",
                      help="resize 2-D images to this size instead of the model's default (timm's 224): small images "
                      "stay small and the audit is faster. CNNs take any size; models with a fixed grid (ViTs) are "
                      "built for it")
    data.add_argument("--spatial-size", default=None, metavar="N or D,H,W",
                      help="resize every sample (volumes too) to this size; one number: the same on every axis")
    demo = a.add_argument_group("demo options")
    demo.add_argument("--noise", type=float, default=DEFAULT_NOISE, help="share of labels flipped (default %(default)s)")
    demo.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs (default %(default)s)")
    demo.add_argument("--limit", type=int, default=None, help="use only this many digits (quick runs)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the noise, the training and the sketch")
    opts = a.add_argument_group("audit options")
    opts.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours per sample (default %(default)s)")
    opts.add_argument("--sketch-dim", type=int, default=None,
                      help=f"feature dimension per output (default: {DEFAULT_SKETCH_DIM}, or 2048/C for --output full)")
    opts.add_argument("--batch-size", type=int, default=64,
                      help="samples per pass, at most: lowered to fit --max-memory (default %(default)s)")
    opts.add_argument("--max-memory", default=None, metavar="SIZE",
                      help="memory a pass may use, e.g. 8GB or 512MB (default: 70%% of the available RAM, or of the "
                      "GPU's free memory); the batch size is lowered to fit, and a model that needs more for one "
                      "sample is refused before anything runs")
    opts.add_argument("--output", default=None, choices=["contrast", "full", "logit", "sum"],
                      help="what is differentiated, never with the labels (default: full for classifiers with at "
                      "most 16 classes, contrast of the predicted class above)")
    names = ", ".join(spec.name for check in CHECKS for spec in check.thresholds)
    opts.add_argument("--threshold", action="append", metavar="NAME=VALUE",
                      help=f"change a threshold: {names} (see nnsim_hooks.audit.Thresholds)")
    for check in CHECKS:
        check.add_cli_arguments(opts)
    opts.add_argument("--decisions", metavar="FILE.csv", default=None,
                      help="apply the decisions exported from an earlier report (path_or_index,decision,new_label: "
                      "relabel, remove or keep) to --data before auditing; recorded in summary.json")
    opts.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                      help="where the model runs with --data: auto (default) is this rank's GPU under torchrun, "
                      "else GPU 0 when torch sees one, else the CPU")
    stored = a.add_argument_group("a stored index (no model, no data)")
    stored.add_argument("--index", default=None, metavar="PATH",
                        help="audit this finished index folder (or an earlier audit's --out folder) without running "
                             "the model again")
    stored.add_argument("--dry-run", action="store_true",
                        help="with --index: print what each step will cost for its N and D, and stop")
    opts.add_argument("--recall", type=float, default=0.95,
                      help="target recall@k of the neighbour search, in (0, 1]: large indexes are searched "
                           "approximately, tuned to reach it on held-out exact queries (default %(default)s; 1: exact)")
    opts.add_argument("--exact-neighbors", action="store_true", help="exact neighbour search whatever N (slow at "
                      "millions of samples)")
    opts.add_argument("--no-progress", action="store_true", help="no progress bars")
    opts.add_argument("-v", "--verbose", action="store_true", help="log what happens")


#: Each adds one subcommand to the parser and sets ``run=fn(args) -> exit code`` on it.
#: A new subcommand (its own module) appends its ``add_parser(sub)`` here.
SUBCOMMANDS: List[Callable[[Any], None]] = [_add_audit, index_cli.add_parser]


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(prog="nnsim", description="Input similarity from the neural network's perspective.")
    parser.add_argument("--version", action="version", version=f"nnsim_hooks {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    _add_debug_flag(parser, False)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--debug`` on ``parser`` and every subcommand's parser (before or after the subcommand)."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, print the Python traceback too (for bug reports)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug_flag(child, argparse.SUPPRESS)


def _load_integrations():
    """The seam to ``nnsim_hooks.integrations`` (model and dataset loaders)."""
    try:
        from .. import integrations
    except ImportError as exc:
        raise CliError(f"--data/--model need nnsim_hooks.integrations, which failed to import: {exc}") from exc
    missing = [name for name in ("load_model", "load_dataset") if not callable(getattr(integrations, name, None))]
    if missing:
        raise CliError(
            f"--data/--model need nnsim_hooks.integrations.{' and '.join(missing)}, which this installation lacks; "
            "update nnsim_hooks, or audit from Python with nnsim_hooks.audit(model, dataset)"
        )
    return integrations


def _layouts():
    """The registry of dataset layouts (``nnsim_hooks.integrations.layouts``): the ``--data``
    help, checks and messages come from it, so a new layout needs no edit here."""
    try:
        from ..integrations import layouts
    except ImportError as exc:
        raise CliError(f"--data needs nnsim_hooks.integrations, which failed to import: {exc}") from exc
    return layouts


def _data_help() -> str:
    try:
        return _layouts().data_help()
    except CliError:  # the parser still builds; --data then says why
        return "your dataset (needs nnsim_hooks.integrations)"


def _check_data_path(data: str) -> None:
    layouts = _layouts()
    path = Path(data)
    if layouts.layout_of(data) is not None:  # a pattern of shards need not exist as a path
        return
    if not path.exists():
        raise CliError(f"--data {data}: no such folder or file (expected {layouts.expected()})")
    if layouts.layout_of(str(path)) is None:
        raise CliError(f"--data {data}: a {path.suffix or 'extensionless'} file is not a data layout "
                       f"(expected {layouts.expected()})")


def _classes(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise CliError(f"--classes {text!r}: empty class name; expected NAME,NAME,... in index order")
    if len(set(names)) != len(names):
        raise CliError(f"--classes {text!r}: class names must be distinct")
    return names


def _audit_data(args, thresholds) -> Any:
    from torch import nn

    from ..audit.run import audit

    if not args.model:
        raise CliError("--data needs --model (e.g. --model timm:resnet18 --checkpoint weights.pt, or --model timm:resnet18 "
                       "--train 10 to fit it on the data first)")
    from ..audit.batch_memory import parse_memory

    parse_memory(args.max_memory, "--max-memory")  # before the model is built
    _check_data_path(args.data)
    if args.decisions is not None and not Path(args.decisions).is_file():
        raise CliError(f"--decisions {args.decisions}: no such file (the CSV the report's 'Download decisions' button "
                       "writes)")
    classes = _classes(args.classes)
    train = _train_recipe(args)
    kwargs = {}
    if args.model_kwargs:
        try:
            kwargs = json.loads(args.model_kwargs)
        except ValueError as exc:
            raise CliError(f"--model-kwargs is not valid JSON: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise CliError(f"--model-kwargs must be a JSON object, got {type(kwargs).__name__}")
    integrations = _load_integrations()
    info = integrations.load_model(args.model, model_kwargs=kwargs, checkpoint=args.checkpoint,
                                   num_classes=args.num_classes)
    info = _input_size(integrations, info, args)
    model = info if isinstance(info, nn.Module) else getattr(info, "model", None)
    if not isinstance(model, nn.Module):
        raise CliError(f"integrations.load_model({args.model!r}) returned {type(info).__name__} without a model")
    model.to(args.resolved_device)
    # classes= only when given: the seam stays load_dataset(path, model_info) otherwise
    options = _layout_options(args)
    dataset = integrations.load_dataset(args.data, info, **({"classes": classes} if classes is not None else {}),
                                        **options)
    if not _sized(args):  # data too small for the network: say which --spatial-size resizes them
        _check_data_size(integrations, info, dataset)
    # A model without class logits (segmentation...) comes with a suggested label-free reduction.
    suggested = getattr(info, "output", None)
    output = args.output if args.output is not None or not callable(suggested) else suggested
    config = {
        # a pattern of shards or fiftyone:NAME is no path: kept as given
        "data": str(Path(args.data).resolve()) if Path(args.data).exists() else args.data,
        "model": args.model,
        "model_kwargs": kwargs,
        "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
        "num_classes": args.num_classes,
        "k": args.k,
        "sketch_dim": args.sketch_dim,
        "output": args.output,
        "seed": args.seed,
        **({"input_size": list(info.data_config.spatial_size)} if _sized(args) else {}),
        "thresholds": thresholds or {},
    }
    if classes is not None:  # only then: runs without --classes keep the configuration they resume with
        config["classes"] = classes
    config.update(options)  # the same: recorded only when given
    if train is not None:
        config["train"] = train.as_dict()
    if args.decisions is not None:
        from ..audit.decisions import fingerprint

        config["decisions"] = fingerprint(args.decisions)
    return audit(
        model,
        dataset,
        out_dir=args.out,
        overwrite=args.overwrite,
        k=args.k,
        sketch_dim=args.sketch_dim,
        batch_size=args.batch_size,
        output=output,
        thresholds=thresholds,
        progress=not args.no_progress,
        seed=args.seed,
        class_names=getattr(dataset, "classes", None) or None,
        config=config,
        decisions=args.decisions,
        max_memory=args.max_memory,
        train=train,
        neighbor_layers=_neighbor_layers(args.neighbor_layers),
    )


def _neighbor_layers(text):
    """--neighbor-layers: None, "first_half", or a list of module names / patterns."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise CliError("--neighbor-layers is empty: give first-half, or module names such as layer1,layer2")
    if len(names) == 1 and names[0].replace("-", "_") in ("first_half", "all"):
        return names[0].replace("-", "_")
    return names


#: the CLI flags that are layout options (Hugging Face datasets, WebDataset shards)
LAYOUT_FLAGS = ("image_column", "label_column", "split", "id_column")


def _layout_options(args) -> dict:
    """The layout options given on the command line, checked against --data's layout."""
    options = {name: getattr(args, name) for name in LAYOUT_FLAGS if getattr(args, name, None) is not None}
    layout = _layouts().layout_of(args.data)
    ignored = [name for name in options if layout is None or name not in layout.options]
    if ignored:
        flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
        raise CliError(f"{flags}: not read by {layout.name if layout else 'this'} data ({args.data}); "
                       f"they are for Hugging Face datasets and WebDataset shards")
    return options


def _check_data_size(integrations, info, dataset) -> None:
    check = getattr(integrations, "check_data_size", None)
    first = dataset.check() if callable(getattr(dataset, "check", None)) else None
    if check is None or first is None or not hasattr(info, "data_config"):
        return
    check(info, tuple(dataset[first][0].shape))
#: --folds when --train is given without it: 5 models, each on four fifths of the data (fewer for
#: a class with fewer samples); on 305 shapes they find the planted errors at AUROC 0.95, two
#: half-data models at 0.85 (benchmarks/results/label_issues.md)
DEFAULT_FOLDS = "auto"


def _folds(text: str):
    """``--folds``: an integer, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or auto") from None


def _train_recipe(args):
    """The :class:`~nnsim_hooks.audit.fitting.TrainingRecipe` of ``--train``/``--folds`` (None: no training)."""
    if args.train is None:
        if args.folds is not None:
            raise CliError("--folds is for --train: it cross-fits the models that --train fits")
        if args.augment is not None:
            raise CliError("--augment is for --train: it transforms the samples the models that --train fits see")
        return None
    from ..audit.fitting import TrainingRecipe

    return TrainingRecipe(epochs=args.train, folds=DEFAULT_FOLDS if args.folds is None else args.folds,
                          seed=args.seed, augment=args.augment or "none")


def _sized(args) -> bool:
    return args.image_size is not None or args.spatial_size is not None


def _input_size(integrations, info, args):
    """The loaded model set up for ``--image-size`` / ``--spatial-size`` (nothing given: as it is)."""
    if args.image_size is not None and args.spatial_size is not None:
        raise CliError("--image-size and --spatial-size both given; give one (--image-size is the 2-D shorthand)")
    if not _sized(args):
        return info
    with_size = getattr(integrations, "with_input_size", None)
    if with_size is None:
        raise CliError("--image-size/--spatial-size need nnsim_hooks.integrations.with_input_size, which this "
                       "installation lacks; update nnsim_hooks")
    flag, size = ("--image-size", args.image_size) if args.image_size is not None else ("--spatial-size",
                                                                                         args.spatial_size)
    return with_size(info, size, flag)


def neighbor_line(plan: Optional[Dict[str, Any]]) -> str:
    """How the neighbour lists were searched, and the recall measured."""
    if not plan:
        return "  neighbours        (not recorded)"
    if plan.get("method") == "partition":
        return (f"  neighbours        approximate (nprobe {plan.get('nprobe')} of {plan.get('nlist')} lists): recall@"
                f"{plan.get('k')} {plan.get('recall_measured')} measured on {plan.get('recall_sample')} held-out exact "
                f"queries (target {plan.get('recall_target')})")
    if plan.get("method") == "cross-fitted":
        return (f"  neighbours        cross-fitted: each sample through the one of {plan.get('folds')} models that never "
                "saw it (exact search)")
    return "  neighbours        exact search (recall 1)"


def format_summary(result, out: Path) -> str:
    """The few lines printed at the end of ``nnsim audit``: the run, the warnings (before the counts they
    qualify), each check's lines, the skipped samples."""
    from ..audit.checks import CHECKS
    from ..audit.checks.check import warnings_of
    from ..audit.presentation import plain_num as num, plain_pct as pct, warning_lines

    s = result.summary
    den = s.get("denoising", {})

    lines = [
        f"nnsim audit: {s['samples']:,} samples, {s.get('num_classes') or '?'} classes "
        f"(model {s.get('model')}, output {s.get('output')}, {s.get('seconds', 0):.0f} s)",
    ]
    lines += warning_lines(warnings_of(s))  # before the counts: they say how far to trust them
    lines += [line for check in CHECKS for line in check.summary_lines(s)]
    lines.append(neighbor_line(s.get("neighbors")))
    if s.get("unreadable"):
        lines.append(f"  unreadable        {s['unreadable']:,} files skipped (listed in summary.json)")
    if s.get("non_finite"):
        lines.append(f"  NaN or Inf        {s['non_finite']:,} samples skipped (input or gradient; listed in summary.json)")
    if s.get("missing_labels"):
        lines.append(f"  missing labels    {s['missing_labels']:,} samples (not scored)")
    decided = s.get("decisions")
    if decided:
        lines.append(f"  your decisions    {decided['removed']:,} removed, {decided['relabelled']:,} relabelled, "
                     f"{decided['kept']:,} kept ({decided.get('file') or 'given'})")
    extra = s.get("extra") or {}
    if "agreement_with_true_labels" in extra:
        lines += [
            f"Paper's headline (planted noise {pct(extra['planted_noise_rate'])}):",
            f"  network vs noisy training labels   {pct(extra['agreement_with_noisy_labels'])}",
            f"  network vs true labels             {pct(extra['agreement_with_true_labels'])}",
            f"  audit, label-free: predicted agreement with clean labels {pct(den.get('predicted_agreement_with_clean_labels'))}"
            f" (estimated noise {pct(den.get('estimated_noise_rate'))}, median N_eff {num(den.get('median_effective_neighbors'))})",
            f"  flags: {pct(extra.get('label_issue_recall'))} of the planted errors found, "
            f"{pct(extra.get('label_issue_precision'))} of the flags are planted errors",
        ]
    training = s.get("training")
    if training and training.get("checkpoint"):
        lines.append(f"Trained model: {Path(training['checkpoint']).resolve()} (load it with --checkpoint)")
    lines.append(f"Report: {(out / 'report.html').resolve()}")
    return "\n".join(lines)


def cmd_audit(args) -> int:
    from ..audit.demo import run_demo
    from ..audit.run import require_audit_extra

    from ..model_device import choose_device

    require_audit_extra()
    args.resolved_device = choose_device(args.device)  # before anything loads: a missing GPU fails first
    thresholds = _thresholds(args.threshold, args)
    if not args.out.strip():
        raise CliError("--out is empty: name the folder the audit writes to (e.g. --out nnsim-audit)")
    out = Path(args.out)
    demo_only = [flag for flag, given in (("--model", args.model), ("--checkpoint", args.checkpoint),
                                          ("--num-classes", args.num_classes), ("--model-kwargs", args.model_kwargs),
                                          ("--classes", args.classes), ("--decisions", args.decisions),
                                          ("--image-column", args.image_column),
                                          ("--label-column", args.label_column), ("--split", args.split),
                                          ("--id-column", args.id_column),
                                          ("--image-size", args.image_size), ("--spatial-size", args.spatial_size),
                                          ("--train", args.train), ("--folds", args.folds),
                                          ("--augment", args.augment), ("--neighbor-layers", args.neighbor_layers))
                 if given is not None]
    if args.index is not None:
        return _audit_index(args, thresholds, demo_only)
    if args.dry_run:
        raise CliError("--dry-run needs --index PATH (the stored index whose N and D the estimate uses)")
    if args.data is None:
        if demo_only:
            raise CliError(f"{', '.join(demo_only)} given without --data: pass --data PATH too, or drop them to run the demo")
        result = run_demo(out, noise=args.noise, epochs=args.epochs, limit=args.limit, seed=args.seed, k=args.k,
                          sketch_dim=args.sketch_dim, output=args.output, thresholds=thresholds,
                          overwrite=args.overwrite, progress=not args.no_progress)
    else:
        result = _audit_data(args, thresholds)
    print(format_summary(result, out))
    return 0


def _audit_index(args, thresholds, model_flags: List[str]) -> int:
    """``nnsim audit --index PATH``: the checks on a stored index, or (``--dry-run``) their estimated cost."""
    from ..audit.stored import audit_index, index_folders

    given = [f for f in model_flags if f != "--classes"] + (["--data"] if args.data else [])
    if given:
        raise CliError(f"--index audits a stored index: {', '.join(given)} would not be used; drop them")
    if args.dry_run:
        from ..audit.cost_estimate import estimate_audit

        from ..index.all_neighbors import check_recall

        check_recall(args.recall)
        main_index, denoise = index_folders(args.index)
        print(estimate_audit(main_index, denoise, k=args.k, recall=1.0 if args.exact_neighbors else args.recall))
        return 0
    out = Path(args.out)
    result = audit_index(args.index, out_dir=out, k=args.k, recall=args.recall,
                         exact_neighbors=True if args.exact_neighbors else None, max_memory=args.max_memory,
                         thresholds=thresholds, progress=not args.no_progress, overwrite=args.overwrite,
                         class_names=_classes(args.classes))
    print(format_summary(result, out))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        index_cli.init_distributed(args)  # under torchrun: the ranks share the index builds
        return args.run(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted: what was computed is kept in {getattr(args, 'out', '.')}; run the same command again "
              "to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user; the traceback with --debug
        if args.debug:
            raise
        print(error_line(exc), file=sys.stderr)
        return 1


def error_line(exc: Exception) -> str:
    """What ``nnsim`` prints for an error: our own errors (and OS errors: a missing file, a
    full disk) say what and how to fix it; anything else is a bug, reported as one."""
    if isinstance(exc, (NnsimError, InputError, ImportError, OSError)):
        return f"nnsim: error: {exc}"
    return (f"nnsim: error: {type(exc).__name__}: {exc}\nThis is unexpected (a bug in nnsim_hooks or in your model "
            "code): run the same command with --debug to see where it happened, and report it")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
