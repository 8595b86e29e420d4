"""The ``fastcolor`` command line (also ``python -m fastcolor``): argparse and one ``cmd_*``
function per subcommand.

Subcommands: ``colorize``, ``train``, ``eval``, ``bench``, ``demo``, ``info``. Each has
``--help`` with examples. Exit status: 0 on success, 2 on bad usage or bad input (a
one-line ``fastcolor: error: ...`` on stderr, no traceback), 1 when something failed
while running (e.g. out of GPU memory), 130 when interrupted. ``--debug`` (anywhere on
the command line) prints the traceback as well.

Each command is a thin layer over the library (:func:`fastcolor.train.train`,
:func:`fastcolor.metrics.evaluate`) and the rest of the application
(:mod:`fastcolor.app.colorize_files`, :mod:`fastcolor.app.weights`, :mod:`fastcolor.app.bench`,
:mod:`fastcolor.app.demo`). :func:`main` takes an argv list and returns the exit status, so it
can be called in-process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fastcolor import __version__
from fastcolor.app import bench
from fastcolor.app.colorize_files import colorize_files, plan_colorize
from fastcolor.app.demo import PHOTOS, run_demo
from fastcolor.app.info import info_dict
from fastcolor.app.messages import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, CLIError, note,
                                    one_line, say, warn)
from fastcolor.app.threads import idle_cpu_threads
from fastcolor.app.weights import MODELS, load_weights, resolve_weights, split_matches_data
from fastcolor.backends import BackendUnavailable
from fastcolor.colorize import MemoryLimitError, is_out_of_memory
from fastcolor.data import NoReadableImagesError, UnreadableImageError
from fastcolor.io import DirectoryLockedError, DiskFullError, check_unlocked
from fastcolor.metrics import evaluate
from fastcolor.models import PRESETS
from fastcolor.train import RUN_FILES, CheckpointError, TrainConfig, check_device, checkpoint_meta, train

# ----------------------------------------------------------------------------- argparse


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors become one :class:`CLIError` line (exit status 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise CLIError(f"{message} (see '{self.prog} --help')", EXIT_USAGE)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


#: The largest --size: 65536^2 pixels is already far beyond any machine's memory for the
#: networks (the memory checks refuse it with numbers); larger values overflow size arithmetic.
MAX_SIZE = 1 << 16


def _size(text: str) -> int:
    v = _positive_int(text)
    if v < 8 or v % 8 or v > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 (the networks downsample by 8) from 8 to "
                                         f"{MAX_SIZE}, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return v


def _add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    # On subcommands the default is SUPPRESS so that `fastcolor --debug colorize ...` is not
    # overwritten by the subcommand's own default.
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="on error, print the full traceback too")


def _sub(subs, name: str, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    p = subs.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=_formatter)
    _add_common(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, formatter_class=_formatter,
        description="Fast Zhang, Isola & Efros (ECCV16) colorization: train, evaluate, colorize, benchmark.",
        epilog="""\
examples:
  fastcolor demo                                   # everything, on the photos bundled with scikit-image
  fastcolor train photos/ --model zhang-small --out runs/zhang
  fastcolor colorize old_photos/ -o colorized/ --weights runs/zhang
  fastcolor eval runs/zhang photos/
  fastcolor bench --device cpu
  fastcolor info

exit status: 0 success, 2 bad usage or bad input, 1 failure while running, 130 interrupted.
'fastcolor COMMAND --help' shows each command's options and examples.""")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_common(parser, top=True)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # -- colorize -------------------------------------------------------------------------------
    p = _sub(subs, "colorize", "colorize image files or folders with trained weights",
             """\
Colorize grayscale (or colour: only their lightness is used) images.

The network sees each image resized to --size x --size; the predicted ab is upsampled
and joined with the ORIGINAL full-resolution L, so every output has its input's size and
lightness. Grayscale, RGB and RGBA inputs are accepted (alpha is kept where the output
format can store it). Folders are searched recursively.

Outputs: with one input file and an -o that ends in an image suffix, -o is the output
file. Otherwise -o is a folder: a file input becomes OUT/<name>, a folder input's images
keep their path relative to that folder. The format follows the input's suffix (.png
for uncommon formats, and for inputs with alpha whose format cannot store it).
Files are written atomically (temp file + rename). An existing output is never replaced
unless --overwrite is given (--skip-existing leaves existing outputs alone instead), and an
input of the same command is never an output, even with --overwrite.

Unreadable inputs (and anything that is not a regular file: FIFOs, devices, dangling
symbolic links) are skipped with a warning; the exit status is 0 if at least one
image was colorized and 2 if none could be.

No pretrained weights ship with fastcolor (none can be downloaded): train a model with
'fastcolor train' (or run 'fastcolor demo') and pass its run directory to --weights.""",
             """\
examples:
  fastcolor colorize photo.jpg -o photo_color.png --weights runs/zhang
  fastcolor colorize scans/ more/old.png -o colorized/ --weights runs/zhang/model.safetensors
  fastcolor colorize scans/ -o colorized/ --weights demo_out/runs/fusion-small --device cpu
  fastcolor colorize scans/ -o colorized/ --weights runs/zhang --temperature 0.2 --size 256""")
    p.add_argument("inputs", nargs="+", metavar="IN", help="image files and/or folders (searched recursively)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (one input) or folder")
    p.add_argument("--weights", metavar="PATH",
                   help="a run directory from 'fastcolor train', its model.safetensors, or a checkpoint")
    p.add_argument("--model", choices=sorted(MODELS), metavar="{zhang,zhang-small,fusion,...}",
                   help="the kind of model expected; checked against --weights (and picks one run when "
                        "--weights is a folder of runs, e.g. demo_out)")
    p.add_argument("--backbone-weights", metavar="FILE",
                   help="fusion: local weights file for the backbone (a path stored in --weights is never read)")
    p.add_argument("--temperature", "-T", type=_positive_float, default=0.38, metavar="T",
                   help="annealed-mean temperature, Zhang models only (default: %(default)s; lower = bolder)")
    p.add_argument("--size", type=_size, metavar="N", help="side the network sees (default: the model's training size)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: %(default)s")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="images per forward pass "
                   "(default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--skip-existing", action="store_true", help="leave existing output files alone")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_colorize)

    # -- train ----------------------------------------------------------------------------------
    p = _sub(subs, "train", "train a colorization model on a folder of images",
             """\
Train a Zhang et al. network (313-bin classification with the fused class-rebalanced
cross-entropy) or the Deep Koalarization fusion network (ab regression) on DATA.

DATA is a folder of images (one class) or of class subfolders. It is split 80/10/10
(train/validation/test, per class, seeded). The run directory gets the split, the class
prior and rarity weights, atomically written checkpoints after every epoch
(last.safetensors, best.safetensors), the best model (model.safetensors + model.json),
metrics.jsonl, loss_curve.png and result.json. Training stops early when the validation
loss stops improving (--patience).

A run directory that already holds a checkpoint is only continued with --resume, or
started afresh with --restart (which deletes the earlier run's checkpoints, split, prior,
metrics and model). A run directory is used by one training process at a time: a second
one refuses, naming the first one's pid. A split or prior left by an earlier attempt on other
data is made anew (with --resume: refused, saying what changed).
Fusion models use a torchvision backbone with RANDOM weights unless --backbone-weights
names a local file (nothing is downloaded; pass it again with --resume).""",
             """\
examples:
  fastcolor train photos/ --out runs/zhang                      # zhang-small, rebalanced loss
  fastcolor train photos/ --model fusion-small --out runs/fusion --epochs 20
  fastcolor train photos/ --model zhang --size 256 --class beach --class forest --out runs/z256
  fastcolor train photos/ --out runs/zhang --resume             # continue after an interruption
then:
  fastcolor eval runs/zhang photos/
  fastcolor colorize old/ -o colorized/ --weights runs/zhang""")
    p.add_argument("data", metavar="DATA", help="folder of images, or of one subfolder per class")
    p.add_argument("--out", "-o", required=True, metavar="RUN_DIR", help="run directory to write")
    p.add_argument("--model", choices=sorted(MODELS), default="zhang-small", metavar="{zhang,zhang-small,fusion,...}",
                   help=f"one of {', '.join(MODELS)} (default: %(default)s)")
    p.add_argument("--loss", choices=["auto", "rebalanced", "ce", "mse"], default="auto",
                   help="rebalanced/ce for Zhang models, mse for fusion (default: auto = rebalanced or mse)")
    p.add_argument("--epochs", type=_positive_int, default=40, metavar="E", help="default: %(default)s")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="B", help="default: %(default)s")
    p.add_argument("--size", type=_size, metavar="N", help="training image side (default: the model's, e.g. 128 "
                   "for zhang-small); recorded in the model, so colorize uses it too")
    p.add_argument("--class", dest="classes", action="append", metavar="NAME",
                   help="train on this class subfolder only (repeatable)")
    p.add_argument("--workers", type=int, default=2, metavar="W", help="data loader processes (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    g.add_argument("--restart", action="store_true", help="start a new run in RUN_DIR: delete the files of the "
                   "earlier run there first (checkpoints, split, prior, metrics, model)")
    p.add_argument("--lr", type=_positive_float, default=3e-4, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--patience", type=_positive_int, default=7, help="early-stopping patience in epochs "
                   "(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--max-steps-per-epoch", type=_positive_int, metavar="S", help="cut epochs short (quick tries)")
    p.add_argument("--backbone-weights", metavar="FILE", help="fusion: local weights file for the backbone")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no random flips/rotations/zooms")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    # -- eval -----------------------------------------------------------------------------------
    p = _sub(subs, "eval", "metrics tables of a trained model",
             """\
Evaluate a trained model on DATA and print the metrics tables (per class and split):
313-bin and coarse accuracy and cross-entropy (Zhang models), ab MSE and R^2, raw and
class-rebalanced AuC, PSNR, SSIM and colourfulness. metrics.md, metrics.json and
comparison.png are written to --out (default: RUN_DIR/eval).

With a run directory and the DATA it was trained on, its own split is used (--split);
on any other folder every image in it is evaluated (split 'all').""",
             """\
examples:
  fastcolor eval runs/zhang photos/
  fastcolor eval runs/zhang photos/ --json > metrics.json
  fastcolor eval runs/zhang holiday_photos/ --compare runs/fusion --out eval_holiday
  fastcolor eval runs/zhang/model.safetensors photos/ --split all --max-images 50""")
    p.add_argument("weights", metavar="RUN_DIR_or_WEIGHTS", help="run directory or model/checkpoint file")
    p.add_argument("data", metavar="DATA", help="folder of images")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of markdown tables")
    p.add_argument("--out", "-o", metavar="DIR", help="where to write metrics.md/json and comparison.png")
    p.add_argument("--compare", metavar="RUN", help="a second model, shown next to the first in the grid")
    p.add_argument("--split", nargs="+", choices=["train", "val", "test", "all"], default=["train", "test"],
                   help="splits of the run to evaluate, or 'all' images in DATA (default: train test)")
    p.add_argument("--temperature", "-T", type=_positive_float, default=0.38, metavar="T", help="default: %(default)s")
    p.add_argument("--max-images", type=_positive_int, metavar="N", help="at most N images per split")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="B", help="default: %(default)s")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: %(default)s")
    p.add_argument("--backbone-weights", metavar="FILE",
                   help="fusion: local weights file for the backbone (a path stored in a weights file is never read)")
    p.set_defaults(func=cmd_eval)

    # -- bench ----------------------------------------------------------------------------------
    p = _sub(subs, "bench", "time every available backend against the torch baseline",
             """\
Time soft-encoding, the fused rebalanced cross-entropy (forward + backward) and the
annealed-mean decoding on every backend available on the device, and print the speed-up
of each over the torch baseline (delegates to 'python -m fastcolor.bench'). Arguments
after the ones below are passed on to fastcolor.bench (see 'python -m fastcolor.bench --help').""",
             """\
examples:
  fastcolor bench --device cpu                  # torch vs cpp vs numba, a minute or two
  fastcolor bench --device cpu --quick          # tiny shapes: seconds
  fastcolor bench --device cuda --shapes zhang  # torch vs triton vs cuda at Zhang's training shape
  fastcolor bench --json > bench.json""")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="default: %(default)s (cuda when there is a GPU)")
    p.add_argument("--json", action="store_true", help="print every number as JSON on stdout (the table goes to "
                   "stderr)")
    p.set_defaults(func=cmd_bench)

    # -- demo -----------------------------------------------------------------------------------
    p = _sub(subs, "demo", "train, evaluate, colorize and benchmark on bundled photos (a few minutes, no network)",
             """\
Show the whole library working, on the colour photos that ship with scikit-image
(no download): hold one photo back (--hold-out), train the small Zhang model (fused rebalanced loss)
and the small fusion model (mobilenet_v3_small backbone with RANDOM weights: nothing can
be downloaded) on augmented crops of the others, evaluate both, colorize the held-back
photo at full resolution and run a quick CPU benchmark of the backends. Writes the
comparison grid, the metrics tables (markdown + JSON), the loss curves and the benchmark
table into --out. A few minutes of training on seven photos makes a demonstration, not a
good colorizer.""",
             """\
examples:
  fastcolor demo                           # about 2-3 minutes on 2 CPU cores, writes demo_out/
  fastcolor demo --out /tmp/demo --quick   # tiny models, ~30 s: checks that everything runs
  fastcolor demo --hold-out chelsea        # keep the cat out of training instead of the coffee cup""")
    p.add_argument("--out", "-o", default="demo_out", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one epoch (a smoke test, ~30 s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--hold-out", default="coffee", metavar="PHOTO",
                   choices=PHOTOS,
                   help="the photo kept out of training and colorized at full resolution: astronaut, chelsea, "
                        "coffee, rocket, hubble_deep_field, immunohistochemistry, retina or motorcycle "
                        "(default: %(default)s)")
    p.set_defaults(func=cmd_demo)

    # -- info -----------------------------------------------------------------------------------
    p = _sub(subs, "info", "version, build and the backends available per device",
             "Print the version, how the native extension was built and which backend each op uses per device.",
             """\
examples:
  fastcolor info
  fastcolor info --json
  FASTCOLOR_BACKEND=numba fastcolor info   # what 'auto' picks with the override""")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)
    return parser


# ----------------------------------------------------------------------------- main


@contextlib.contextmanager
def _one_line_warnings(debug: bool) -> Iterator[None]:
    """Python warnings (e.g. 'skipping unreadable image') as ``fastcolor: warning: ...`` lines."""
    if debug:
        yield
        return
    with warnings.catch_warnings():
        def show(message, category, filename, lineno, file=None, line=None):
            warn(str(message))

        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # known before parsing, so that usage errors honour it too
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "bench":
            raise CLIError(f"unrecognized arguments: {' '.join(extra)} (see 'fastcolor {args.command or ''} --help')"
                           .replace("  ", " "))
        if args.command is None:
            parser.print_help(sys.stderr)
            raise CLIError("a command is required, e.g. 'fastcolor demo' or 'fastcolor colorize --help'")
        with _one_line_warnings(debug):
            if args.command == "bench":
                return int(args.func(args, extra) or EXIT_OK)
            return int(args.func(args) or EXIT_OK)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every error becomes one line (and an exit status)
        if debug:
            traceback.print_exc()
        code, msg = _describe(exc)
        expected = isinstance(exc, CLIError) or code == EXIT_USAGE or msg == str(exc)  # not a surprise
        hint = "" if debug or expected else " (run with --debug for the traceback)"
        print(f"{PROG}: error: {one_line(msg)}{hint}", file=sys.stderr)
        return code


def _describe(exc: BaseException) -> tuple[int, str]:
    """(exit status, message) for an exception that reached :func:`main`."""
    if isinstance(exc, CLIError):
        return exc.code, str(exc)
    if isinstance(exc, DirectoryLockedError):  # names the directory and the owner's pid
        return EXIT_USAGE, str(exc)
    if isinstance(exc, DiskFullError):  # names the file, the space needed and the space free
        return EXIT_FAILURE, str(exc)
    if isinstance(exc, MemoryLimitError):  # says what needed how much, and what to do
        return EXIT_FAILURE, str(exc)
    if is_out_of_memory(exc):
        return EXIT_FAILURE, f"ran out of memory: {exc}"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE, f"{exc.strerror or 'no such file or directory'}: {exc.filename}" if exc.filename else str(exc)
    if isinstance(exc, (ValueError, BackendUnavailable, PermissionError, UnreadableImageError)):
        return EXIT_USAGE, str(exc)
    return EXIT_FAILURE, f"{type(exc).__name__}: {exc}"


def _device(choice: str) -> str:
    """``--device``: auto picks cuda when there is a GPU; asking for cuda without one is an error."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {choice}: no CUDA device is available here (torch {torch.__version__}, "
                       f"built with CUDA {torch.version.cuda}); use --device cpu")
    return choice


# ----------------------------------------------------------------------------- colorize


def cmd_colorize(args) -> int:
    t0 = time.perf_counter()
    weights = resolve_weights(args.weights, args.model)  # before any work: no weights, no point
    jobs, skipped, existing = plan_colorize(args.inputs, args.output, args.overwrite, args.skip_existing)
    for s in skipped:
        warn(f"skipping {s}")
    if not jobs:
        if existing and not skipped:
            say(f"nothing to do: all {existing} outputs already exist (--skip-existing)")
            return EXIT_OK
        raise CLIError(f"nothing was colorized: none of the {len(skipped)} input file(s) could be read")
    for folder in sorted({job.dst.parent for job in jobs}):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CLIError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from exc
        if not os.access(folder, os.W_OK):
            raise CLIError(f"the output folder {folder} is not writable")
    device = _device(args.device)
    model = load_weights(str(weights), args.model, device, backbone_weights=args.backbone_weights)
    size = args.size or int(model.config["input_size"])
    if model.config["arch"] == "fusion" and args.temperature != 0.38:
        note("--temperature has no effect on a fusion model (it regresses ab directly)")
    late: list[str] = []

    def on_skip(msg: str) -> None:
        late.append(msg)
        warn(f"skipping {msg}")

    with idle_cpu_threads(device, log=None):
        written = colorize_files(model, jobs, size, args.temperature, args.batch_size, args.overwrite,
                                 progress=not args.quiet, on_skip=on_skip)
    n_skip = len(skipped) + len(late)
    if not written:
        raise CLIError(f"nothing was colorized: none of the {n_skip} input file(s) could be read")
    if not args.quiet:
        where = written[0] if len(written) == 1 else Path(args.output)
        extra = f"; skipped {n_skip} unreadable" if n_skip else ""
        extra += f"; left {existing} existing" if existing else ""
        say(f"colorized {len(written)} image(s) -> {where} in {time.perf_counter() - t0:.1f} s "
            f"({model.config['arch']} model, size {size}, {device}{extra})")
    return EXIT_OK


# ----------------------------------------------------------------------------- train


def _no_images(args, exc: NoReadableImagesError) -> CLIError:
    return CLIError(f"DATA {args.data}: no readable image in it: {exc.detail}; DATA must be a folder of images "
                    f"(or of class subfolders of images)")


def _damaged_checkpoint(args, exc: CheckpointError) -> CLIError:
    best = (f"{exc.best} (epoch {exc.best_epoch}) is intact: colorize or evaluate with --weights {exc.best}; "
            if exc.best else "")
    head = (f"cannot resume from {exc.path}: {exc.reason}" if args.resume else
            f"{args.out} already holds a run, but its {exc.path.name} is damaged: {exc.reason}")
    return CLIError(f"{head}. {best}pass --restart to start a new run in {args.out} (deletes its checkpoints, "
                    f"split and prior), or choose another --out")


def cmd_train(args) -> int:
    data, run = Path(args.data), Path(args.out)
    if not data.is_dir():
        raise CLIError(f"DATA must be a folder of images, got {args.data!r} ({'not a folder' if data.exists() else 'no such folder'})")
    if run.resolve() == data.resolve() or data.resolve() in run.resolve().parents:
        raise CLIError(f"--out {args.out} is inside DATA {args.data}: its PNGs would be taken for training images; "
                       f"choose a run directory outside the data")
    try:  # before anything is written
        check_device(args.device)
    except ValueError as exc:
        raise CLIError(f"--device {args.device}: {str(exc).split(': ', 1)[-1]}") from None
    if run.exists() and not run.is_dir():
        raise CLIError(f"--out {args.out} exists and is not a folder; choose a run directory")
    check_unlocked(run, "training run")  # refuse early; train() holds the real lock
    config = dict(PRESETS[MODELS[args.model]])
    arch = config["arch"]
    loss = args.loss if args.loss != "auto" else ("mse" if arch == "fusion" else "rebalanced")
    if (arch == "fusion") != (loss == "mse"):
        raise CLIError(f"--loss {loss} does not fit --model {args.model}: use rebalanced or ce for Zhang models, "
                       f"mse for fusion models")
    if args.size:
        config["input_size"] = args.size
    last = run / "last.safetensors"
    if args.restart:
        old = [name for name in RUN_FILES if (run / name).exists()]
        if old:
            note(f"--restart: deleting the earlier run's {', '.join(old)} in {args.out}")
    elif last.exists():
        try:
            meta = checkpoint_meta(last)
        except CheckpointError as exc:
            raise _damaged_checkpoint(args, exc) from None
        if not args.resume:
            raise CLIError(f"{args.out} already holds a run (last completed epoch {meta['epoch']}); pass --resume to "
                           f"continue it, --restart to start a new run there, or choose another --out")
        note(f"resuming {args.out} from its last checkpoint")
    elif args.resume:
        note(f"nothing to resume in {args.out}: starting a new run")
    if arch == "fusion" and not args.backbone_weights:
        note("the fusion backbone has random weights (none can be downloaded; --backbone-weights takes a local "
             "file): expect it to help little")
    cfg = TrainConfig(
        data_dir=str(data), run_dir=str(run), model=config, loss=loss, classes=args.classes, image_size=args.size,
        batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, patience=args.patience, seed=args.seed,
        augment=args.augment, workers=args.workers, resume=True, restart=args.restart, device=args.device,
        precision=args.precision, backbone_weights=args.backbone_weights, max_steps_per_epoch=args.max_steps_per_epoch,
        progress=not args.quiet)
    t0 = time.perf_counter()
    try:
        with idle_cpu_threads(_device(args.device)):
            res = train(cfg)
    except KeyboardInterrupt:
        if (run / "last.safetensors").is_file():
            note(f"the last completed epoch is saved in {run / 'last.safetensors'}; continue with the same "
                 f"command and --resume")
        raise
    except CheckpointError as exc:
        raise _damaged_checkpoint(args, exc) from exc
    except NoReadableImagesError as exc:
        raise _no_images(args, exc) from exc
    except DiskFullError as exc:
        keep = (f"; {last} holds the last completed epoch: free the space, then continue with the same command "
                f"and --resume" if last.is_file() else "")
        raise CLIError(f"{exc}{keep}", EXIT_FAILURE) from exc
    first = -1 if res.resumed_from_epoch is None else res.resumed_from_epoch
    new = [h for h in res.history if h["epoch"] > first]
    if not new:
        say(f"nothing to do: {args.out} already completed {res.epochs_completed} epoch(s) (--epochs {args.epochs})")
        return EXIT_OK
    for h in new:
        if not args.quiet:
            say(f"epoch {h['epoch']:3d}  train {h['train_loss']:.4f}  val {h['val_loss']:.4f}"
                f"{'  best' if h['best'] else ''}  ({h['seconds']:.1f} s)")
    stop = " (stopped early)" if res.stopped_early else ""
    say(f"trained {args.model} ({loss} loss) for {res.epochs_completed} epoch(s){stop} in "
        f"{time.perf_counter() - t0:.0f} s; best validation loss {res.best_val_loss:.4f} at epoch {res.best_epoch}")
    say(f"run directory: {run}  (model.safetensors, loss_curve.png, metrics.jsonl)")
    say(f"next: fastcolor eval {run} {data}")
    say(f"      fastcolor colorize IMAGES... -o colorized/ --weights {run}")
    return EXIT_OK


# ----------------------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    src = Path(args.weights)
    if not src.exists():
        raise CLIError(f"no such run directory or weights file: {args.weights}")
    data = Path(args.data)
    if not data.is_dir():
        raise CLIError(f"DATA must be a folder of images, got {args.data!r}")
    model_file = resolve_weights(args.weights)
    compare = str(resolve_weights(args.compare)) if args.compare else None
    run_dir = model_file.parent
    out = Path(args.out) if args.out else run_dir / "eval"
    device = _device(args.device)
    use_split = "all" not in args.split and split_matches_data(run_dir, data)
    if "all" not in args.split and (run_dir / "split.json").is_file() and not use_split:
        note(f"{args.data} is not the data {run_dir} was trained on: evaluating every image in it (split 'all')")
    try:
        with idle_cpu_threads(device, log=None):
            report = evaluate(model_file, data, out_dir=out, splits=args.split if use_split else ("all",),
                              compare=compare, T=args.temperature, batch_size=args.batch_size, device=device,
                              max_images=args.max_images, backbone_weights=args.backbone_weights)
    except NoReadableImagesError as exc:
        raise _no_images(args, exc) from exc
    if args.json:
        say(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        say(Path(report["files"]["markdown"]).read_text().rstrip())
    note(f"wrote {', '.join(report['files'].values())}")
    return EXIT_OK


# ----------------------------------------------------------------------------- bench / demo / info


def cmd_bench(args, extra: Sequence[str] = ()) -> int:
    device = _device(args.device)
    argv = ["--device", device, *extra]
    if not args.json:
        return int(bench.main(argv) or 0)
    # the benchmark prints its table last; keep stdout pure JSON and show the table on stderr.
    with tempfile.TemporaryDirectory(prefix="fastcolor-bench-") as tmp:
        path = Path(tmp) / "bench.json"
        with contextlib.redirect_stdout(sys.stderr):
            rc = bench.main([*argv, "--json", str(path)])
        say(path.read_text().rstrip())
    return int(rc or 0)


def cmd_demo(args) -> int:
    device = _device(args.device)
    run_demo(args.out, quick=args.quick, device=device, seed=args.seed, held_out=args.hold_out)
    return EXIT_OK


def cmd_info(args) -> int:
    info = info_dict()
    if args.json:
        say(json.dumps(info, indent=2, sort_keys=True, default=str))
        return EXIT_OK
    b = info["build_info"]
    say(f"fastcolor {info['version']}  (python {info['python']}, torch {b.get('torch')}, numba {b.get('numba')}, "
        f"triton {b.get('triton')})")
    if b["extension"]:
        cuda = f"CUDA kernels for sm {b.get('cuda_archs')}" if b.get("has_cuda_kernels") else "no CUDA kernels"
        say(f"native extension fastcolor._C: built with {b.get('compiler')}, {b.get('build_type')}, "
            f"OpenMP {'on' if b.get('openmp') else 'off'}, CPU ISA {b.get('cpu_isa')}, {cuda}")
    else:
        say(f"native extension fastcolor._C: NOT available: {one_line(b.get('reason') or '?', 300)}")
    env = info["env"][next(iter(info["env"]))]
    say(f"backends (FASTCOLOR_BACKEND={env or 'unset'}):")
    for dev, d in info["devices"].items():
        head = f"  {dev:<5}" + ("" if d["present"] else " (no device here)")
        say(f"{head}  auto -> {d['auto'] or '-'}")
        for name, r in d["backends"].items():
            mark = "yes" if r["available"] else f"no: {one_line(r['reason'], 120)}"
            say(f"      {name:<7} {mark}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
