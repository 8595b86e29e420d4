"""The ``fastcolor`` command line (also ``python -m fastcolor``): argparse and one ``cmd_*``
function per subcommand.

Subcommands: ``colorize``, ``train``, ``eval``, ``bench``, ``demo``, ``export``, ``info``. Each has
``--help`` with examples. Exit status: 0 on success, 2 on bad usage or bad input (a
one-line ``fastcolor: error: ...`` on stderr, no traceback), 1 when something failed
while running (e.g. out of GPU memory), 130 when interrupted, 141 when stdout's reader went away
(``fastcolor ... | head``: no traceback). ``--debug`` (anywhere on
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
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Only what building the parser needs is imported here, none of it importing torch: `fastcolor --help`
# and `--version` answer without torch (tests/test_import.py), and each command imports its own.
from fastcolor._version import __version__
from fastcolor.app.choices import MODELS, PHOTOS
from fastcolor.app.export import cmd_export
from fastcolor.app.messages import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CLIError,
    note,
    one_line,
    say,
    warn,
)
from fastcolor.app.threads import idle_cpu_threads
from fastcolor.recipes import DEFAULT_RECIPE, HYPERPARAMETERS, RECIPES, recipe_values

if TYPE_CHECKING:
    from fastcolor.data import NoReadableImagesError
    from fastcolor.train import CheckpointError, TrainConfig

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


def _nonnegative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


#: What a flag taking "none" returns for it (None itself means "not given": the recipe's value).
_NONE = "none"


def _optional_positive_int(text: str) -> int | str:
    return _NONE if text.lower() == _NONE else _positive_int(text)


def _optional_size(text: str) -> int | str:
    return _NONE if text.lower() == _NONE else _size(text)


def _recipe_lines() -> str:
    return "\n".join(f"  {r.name:<10} {r.summary}" for r in RECIPES.values())


def _add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    # On subcommands the default is SUPPRESS so that `fastcolor --debug colorize ...` is not
    # overwritten by the subcommand's own default.
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="on error, print the full traceback too")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads (default: the idle cores, fewer than all on a busy machine)")


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
  fastcolor export runs/zhang -o zhang.onnx        # the model + its decoding as one ONNX graph
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
'fastcolor train' (or run 'fastcolor demo') and pass its run directory to --weights, or pass
a local copy of the authors' released ECCV16 weights (colorization_release_v2-9b330a0b.pth,
recognised by its keys; read without unpickling code). Those decode at temperature 1 by
default, as the authors' PyTorch code does (a plain softmax); models trained with fastcolor
at 0.38, the paper's; --temperature overrides both.""",
             """\
examples:
  fastcolor colorize photo.jpg -o photo_color.png --weights runs/zhang
  fastcolor colorize scans/ more/old.png -o colorized/ --weights runs/zhang/model.safetensors
  fastcolor colorize scans/ -o colorized/ --weights demo_out/runs/fusion-small --device cpu
  fastcolor colorize scans/ -o colorized/ --weights runs/zhang --temperature 0.2 --size 256
  fastcolor colorize scans/ -o colorized/ --weights colorization_release_v2-9b330a0b.pth""")
    p.add_argument("inputs", nargs="+", metavar="IN", help="image files and/or folders (searched recursively)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (one input) or folder")
    p.add_argument("--weights", metavar="PATH",
                   help="a run directory from 'fastcolor train', its model.safetensors, a checkpoint, or the "
                        "authors' released ECCV16 weights (colorization_release_v2-9b330a0b.pth)")
    p.add_argument("--model", choices=sorted(MODELS), metavar="{zhang,zhang-small,fusion,...}",
                   help="the kind of model expected; checked against --weights (and picks one run when "
                        "--weights is a folder of runs, e.g. demo_out)")
    p.add_argument("--backbone-weights", metavar="FILE",
                   help="fusion: local weights file for the backbone (a path stored in --weights is never read)")
    p.add_argument("--temperature", "-T", type=_positive_float, default=None, metavar="T",
                   help="annealed-mean temperature, Zhang models only (default: the model's: 0.38, the paper's, "
                        "or 1 for the authors' released weights; lower = bolder)")
    p.add_argument("--size", type=_size, metavar="N", help="side the network sees (default: the model's training size)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: %(default)s")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="images per forward pass "
                   "(default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--skip-existing", action="store_true", help="leave existing output files alone")
    p.add_argument("--decode", choices=["auto", "cpu", "gpu"], default="auto",  # fastcolor.data.DECODES
                   help="where JPEGs are decoded: cpu (PIL), gpu (nvjpeg on the GPU; PIL for what it cannot), auto "
                        "(gpu on CUDA when most inputs are JPEGs; default)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    _add_threads(p)
    p.add_argument("--json", action="store_true", help="the summary as JSON on stdout (what was written, skipped, "
                   "left; the settings used)")
    p.set_defaults(func=cmd_colorize)

    # -- train ----------------------------------------------------------------------------------
    p = _sub(subs, "train", "train a colorization model on a folder of images",
             """\
Train a Zhang et al. network (313-bin classification with the fused class-rebalanced
cross-entropy) or the Deep Koalarization fusion network (ab regression) on DATA.

DATA is a folder of images (one class) or of class subfolders. It is split 80/10/10
(train/validation/test, per class, seeded; with --val-data all of DATA trains). The run
directory gets the split (the file index: a resume does not list DATA again), the class
prior and rarity weights (--prior), atomically written checkpoints at every validation
(each epoch's end, or every --val-every steps; last.safetensors, best.safetensors),
the best model (model.safetensors + model.json),
metrics.jsonl, loss_curve.png and result.json. Training stops early when the validation
loss stops improving (--patience). DATA can also be tar shards written by 'fastcolor shard'
(their folder, or a brace pattern of the training shards: 'shards/train-{000000..000099}.tar'),
split when they were written; each rank and loader worker reads its own shards (README, torchrun).

--recipe NAME starts from a named, complete set of hyper-parameters; every flag below
overrides its one value. The recipe and the resolved settings are printed at the start and
recorded in RUN_DIR/train_config.json. Recipes (fastcolor.recipes):
{recipes}

A run directory that already holds a checkpoint is only continued with --resume, or
started afresh with --restart (which deletes the earlier run's checkpoints, split, prior,
metrics and model). A run directory is used by one training process at a time: a second
one refuses, naming the first one's pid. A split or prior left by an earlier attempt on other
data is made anew (with --resume: refused, saying what changed).
Fusion models use a torchvision backbone with RANDOM weights unless --backbone-weights
names a local file (nothing is downloaded; pass it again with --resume).

Under torchrun (torchrun --standalone --nproc_per_node=G -m fastcolor train ...) every
process trains on its share of the images in batches of --batch-size, gradients averaged by
DistributedDataParallel (NCCL on GPUs, gloo on CPUs); only rank 0 prints and writes the run
directory. See the README (torchrun) for several machines.""".replace("{recipes}", _recipe_lines()),
             """\
examples:
  fastcolor train photos/ --out runs/zhang                      # zhang-small, rebalanced loss
  fastcolor train photos/ --recipe zhang2016 --out runs/eccv16  # the authors' solver settings
  fastcolor train photos/ --recipe zhang2016 --max-steps 5000 --lr-milestones 2250 --out runs/z
  fastcolor train imagenet/train/ --val-data imagenet/val/ --val-images 10000 --recipe zhang2016 --out runs/eccv16
  fastcolor train photos/ --recipe study --nongray --target-reduction subsample --out runs/s
  fastcolor train photos/ --model fusion-small --out runs/fusion --epochs 20
  fastcolor train photos/ --model zhang --size 256 --class beach --class forest --out runs/z256
  fastcolor train photos/ --out runs/zhang --resume             # continue after an interruption
  fastcolor train shards/ --recipe zhang2016 --out runs/eccv16  # tar shards from 'fastcolor shard'
then:
  fastcolor eval runs/zhang photos/
  fastcolor colorize old/ -o colorized/ --weights runs/zhang""")
    p.add_argument("data", metavar="DATA", help="folder of images, or of one subfolder per class; or tar shards "
                   "(their folder, or a brace pattern of them)")
    p.add_argument("--out", "-o", required=True, metavar="RUN_DIR", help="run directory to write")
    p.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                   help="the hyper-parameters to start from (default: %(default)s; see above)")
    h = p.add_argument_group("hyper-parameters (default: the recipe's value)")
    h.add_argument("--model", choices=sorted(MODELS), metavar="{zhang,zhang-small,fusion,...}",
                   help=f"one of {', '.join(MODELS)}")
    h.add_argument("--loss", choices=["auto", "rebalanced", "ce", "mse"],
                   help="rebalanced/ce for Zhang models, mse for fusion (auto: the recipe's, mse for fusion)")
    h.add_argument("--epochs", type=_optional_positive_int, metavar="E", help="epochs in all, or 'none' (no limit)")
    h.add_argument("--max-steps", type=_optional_positive_int, metavar="S",
                   help="optimiser steps in all, or 'none' (no limit)")
    h.add_argument("--batch-size", type=_positive_int, metavar="B")
    h.add_argument("--size", type=_size, metavar="N", help="training image side (default: the model's, e.g. 128 "
                   "for zhang-small); recorded in the model, so colorize uses it too")
    h.add_argument("--crop-size", type=_optional_size, metavar="N", help="train on random NxN crops of the --size "
                   "images (validation: the centre crop), or 'none'")
    h.add_argument("--mirror", action=argparse.BooleanOptionalAction, help="random horizontal mirroring")
    h.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="random zoom, rotation, shear and flip (--no-augment: none)")
    h.add_argument("--lr", type=_positive_float, help="Adam learning rate")
    h.add_argument("--betas", type=_positive_float, nargs=2, metavar=("B1", "B2"), help="Adam betas")
    h.add_argument("--weight-decay", type=_nonnegative_float, metavar="WD", help="Adam L2 weight decay")
    h.add_argument("--lr-milestones", type=_positive_int, nargs="*", metavar="S",
                   help="multiply the learning rate by --lr-gamma at each of these steps (none given: constant)")
    h.add_argument("--lr-gamma", type=_positive_float, metavar="G", help="the factor at each milestone")
    h.add_argument("--patience", type=_optional_positive_int, metavar="P",
                   help="early-stopping patience in epochs, or 'none' (no early stopping)")
    h.add_argument("--min-delta", type=_nonnegative_float, metavar="D",
                   help="an improvement is a validation loss lower by at least D")
    h.add_argument("--keep-best", action=argparse.BooleanOptionalAction,
                   help="model.safetensors = the best epoch by validation loss (--no-keep-best: the final weights)")
    h.add_argument("--split", type=_positive_float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of the split (per class)")
    h.add_argument("--prior-lambda", dest="prior_lam", type=_nonnegative_float, metavar="LAM",
                   help="rarity weights: mix of the prior and the uniform distribution")
    h.add_argument("--prior-sigma", type=_positive_float, metavar="SIGMA", help="Gaussian smoothing of the prior")
    h.add_argument("--prior", metavar="data|sample:N|imagenet",
                   help="the class prior of the rarity weights: from every training image, from N of them drawn "
                        "at random (seeded; the default, sample:5000, is every image up to 5000), or the authors' "
                        "published ImageNet prior (no pass over the data; zhang2016's)")
    h.add_argument("--nongray", action=argparse.BooleanOptionalAction,
                   help="no loss for grey images (|a|, |b| <= 5 everywhere), as the authors trained")
    h.add_argument("--target-reduction", choices=["subsample", "area"],  # fastcolor.data.TARGET_REDUCTIONS
                   help="the ab target at the output's resolution: subsample (top-left pixel of each block, the "
                        "authors') or area (block means, fastcolor v1)")
    p.add_argument("--class", dest="classes", action="append", metavar="NAME",
                   help="train on this class subfolder only (repeatable)")
    p.add_argument("--workers", type=int, default=2, metavar="W", help="data loader processes (default: %(default)s)")
    p.add_argument("--decode", choices=["auto", "cpu", "gpu"], default="auto",  # fastcolor.data.DECODES
                   help="where JPEGs are decoded: cpu (PIL in the workers), gpu (the workers read the files, nvjpeg "
                        "decodes each batch on the GPU; PIL for what it cannot), auto (gpu on CUDA when most files "
                        "are JPEGs; default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    g.add_argument("--restart", action="store_true", help="start a new run in RUN_DIR: delete the files of the "
                   "earlier run there first (checkpoints, split, prior, metrics, model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--max-steps-per-epoch", type=_positive_int, metavar="S", help="cut epochs short (quick tries)")
    p.add_argument("--val-images", type=_positive_int, metavar="N",
                   help="validate on N images, a fixed seeded subset of the validation set (default: all of it)")
    p.add_argument("--val-every", type=_positive_int, metavar="STEPS",
                   help="validate and checkpoint every STEPS optimiser steps (default: at the end of each epoch)")
    p.add_argument("--val-data", metavar="DIR", help="validate on the images of DIR (e.g. ImageNet's val/); then "
                   "every image of DATA trains (no validation split is taken from it)")
    p.add_argument("--log-every", type=_positive_int, default=50, metavar="N",
                   help="read the loss (progress bar, finiteness check) every N steps (default: %(default)s)")
    p.add_argument("--tensorboard", nargs="?", const="", metavar="DIR",
                   help="write TensorBoard events (losses, lr, colorized validation images) to DIR "
                        "(default: RUN_DIR/tensorboard); needs pip install 'fastcolor[tensorboard]'")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: SyncBatchNorm (default: BatchNorm statistics from rank 0)")
    p.add_argument("--backbone-weights", metavar="FILE", help="fusion: local weights file for the backbone")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_threads(p)
    p.add_argument("--json", action="store_true", help="the summary as JSON on stdout (epochs, losses, best epoch, "
                   "run directory) instead of its lines")
    p.set_defaults(func=cmd_train)

    # -- shard ----------------------------------------------------------------------------------
    p = _sub(subs, "shard", "write a data folder as tar shards (WebDataset format) for training on many machines",
             """\
Write the images of DATA as tar shards in the WebDataset format, for training on machines
without a shared file system (copy OUT to each machine, or serve it over HTTP).

DATA is split as 'fastcolor train' splits a folder (80/10/10 per class, seeded: --seed,
--split) and each split becomes its own shard set: OUT/train-000000.tar ..., OUT/val-000000.tar
..., OUT/test-000000.tar .... Each image is stored as its file's own bytes (no recompression)
with its class; the training images are shuffled first, so each shard mixes the classes.
OUT/shards.json lists the classes and, per shard, its images per class. Each shard is written
under a temporary name and renamed when complete, and the index last, so an interrupted run
leaves no partial shard. OUT must be new or empty. Unreadable files are skipped with a warning.

Train on it with 'fastcolor train OUT ...' (or a brace pattern of the training shards); reading
shards needs pip install 'fastcolor[shards]' (webdataset), writing them does not.""",
             """\
examples:
  fastcolor shard imagenet/train shards/ --images-per-shard 1000   # about 110 MB per shard
  fastcolor train shards/ --recipe zhang2016 --out runs/eccv16
  fastcolor train 'shards/train-{000000..001023}.tar' --recipe zhang2016 --out runs/eccv16""")
    p.add_argument("data", metavar="DATA", help="folder of images, or of one subfolder per class")
    p.add_argument("out", metavar="OUT", help="new or empty folder for the shards and shards.json")
    p.add_argument("--images-per-shard", type=_positive_int, default=1000, metavar="N",
                   help="images per shard (default: %(default)s; a shard is built in memory)")
    p.add_argument("--split", type=_positive_float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of the split, per class (default: 0.8 0.1 0.1)")
    p.add_argument("--class", dest="classes", action="append", metavar="NAME",
                   help="only this class subfolder (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="the split's and the shuffle's seed (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_shard)

    # -- eval -----------------------------------------------------------------------------------
    p = _sub(subs, "eval", "metrics tables of a trained model",
             """\
Evaluate a trained model on DATA and print the metrics tables (per class and split).
First the seed study's table in its layout (per class a train and a test row, then the
mean of the classes): 313-bin accuracy and cross-entropy against the k = 5 soft target
for a Zhang model, MSE on ab/128 and R^2 pooled over a and b for a fusion model (see
docs/REPRODUCING.md). Then all metrics: 313-bin and coarse accuracy, soft and hard
(nearest-bin) cross-entropy (Zhang models), ab MSE, pooled and per-channel R^2, raw and
class-rebalanced AuC, PSNR, SSIM and colourfulness. metrics.md, metrics.json and
comparison.png are written to --out (default: RUN_DIR/eval).

With a run directory and the DATA it was trained on, its own split is used (--split);
on any other folder every image in it is evaluated (split 'all').

Several runs (e.g. one per class, as the study trained its models) are each evaluated
on their own split into --out/<run name>/ (default --out: their common folder's eval/),
and their rows are joined into one study table per kind of model (Zhang, fusion),
printed and written to --out/study.md and study.json.""",
             """\
examples:
  fastcolor eval runs/zhang photos/
  fastcolor eval runs/zhang photos/ --json > metrics.json
  fastcolor eval runs/zhang holiday_photos/ --compare runs/fusion --out eval_holiday
  fastcolor eval runs/zhang places/ --compare runs/fusion   # both of the study's tables
  fastcolor eval runs/zhang/model.safetensors photos/ --split all --max-images 50
  fastcolor eval runs/study/*/ places/       # per-class runs: the study's two tables, joined""")
    p.add_argument("weights", nargs="+", metavar="RUN_DIR_or_WEIGHTS",
                   help="run directory or model/checkpoint file; several (e.g. one run per class, as the study "
                        "trained) are each evaluated on their own split, and their study tables joined")
    p.add_argument("data", metavar="DATA", help="folder of images")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of markdown tables")
    p.add_argument("--out", "-o", metavar="DIR", help="where to write metrics.md/json and comparison.png")
    p.add_argument("--compare", metavar="RUN", help="a second model (e.g. the fusion run beside the Zhang run): "
                   "its tables too, and its colorizations next to the first's in the grid")
    p.add_argument("--split", nargs="+", choices=["train", "val", "test", "all"], default=["train", "test"],
                   help="splits of the run to evaluate, or 'all' images in DATA (default: train test)")
    p.add_argument("--temperature", "-T", type=_positive_float, default=None, metavar="T",
                   help="annealed-mean temperature of Zhang models (default: the model's own: 0.38, the paper's; 1 "
                        "for the authors' released weights)")
    p.add_argument("--max-images", type=_positive_int, metavar="N", help="at most N images per split")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="B", help="default: %(default)s")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: %(default)s")
    p.add_argument("--backbone-weights", metavar="FILE",
                   help="fusion: local weights file for the backbone (a path stored in a weights file is never read)")
    p.add_argument("--target-reduction", choices=["subsample", "area"], metavar="{subsample,area}",
                   help="how the true ab is reduced to the logits' size for the 313-bin metrics (default: the run's, "
                        "else subsample)")
    p.add_argument("--decode", choices=["auto", "cpu", "gpu"], default="auto",  # fastcolor.data.DECODES
                   help="where JPEGs are decoded: cpu (PIL), gpu (nvjpeg, batched on the GPU), auto (gpu on CUDA "
                        "when most files are JPEGs; default)")
    _add_threads(p)
    p.set_defaults(func=cmd_eval)

    # -- bench ----------------------------------------------------------------------------------
    p = _sub(subs, "bench", "time every available backend against the torch baseline",
             """\
Time soft-encoding, the fused rebalanced cross-entropy (forward + backward) and the
annealed-mean decoding on every backend available on the device, and print the speed-up
of each over the torch baseline (delegates to 'python -m fastcolor.bench'). --train-step
times a whole Adam step of ZhangNet and ZhangNet.small with the fused loss, the plain
PyTorch loss, the authors' CPU k-NN target and no loss. Arguments after the ones below
are passed on to fastcolor.bench (see 'python -m fastcolor.bench --help').""",
             """\
examples:
  fastcolor bench --device cpu                  # torch vs cpp vs numba, a minute or two
  fastcolor bench --device cpu --quick          # tiny shapes: seconds
  fastcolor bench --device cuda --shapes zhang  # torch vs triton vs cuda at Zhang's training shape
  fastcolor bench --train-step --device cpu     # the training-step table, about 3 minutes
  fastcolor bench --device cuda                 # everything, per mode and the training step: ~5 minutes
  fastcolor bench --loader --device cpu         # images/s per worker of the data path (decoders, Lab)
  fastcolor bench --train-step --data DIR       # the step fed from DIR's images against the in-memory floor
  fastcolor bench --json > bench.json""")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="default: %(default)s (cuda when there is a GPU)")
    p.add_argument("--train-step", action="store_true", help="only the training-step table")
    p.add_argument("--loader", action="store_true", help="the data path per worker: PIL decode (the floor), PIL "
                   "with draft, torchvision's decoder, fastcolor's worker and whole path (more: --images, --rounds)")
    p.add_argument("--data", default=None, metavar="DIR", help="with --train-step: the step fed from the images in "
                   "DIR (workers, device stage; --workers, --decode auto|cpu|gpu) against the same step from memory")
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

    # -- export ---------------------------------------------------------------------------------
    p = _sub(subs, "export", "write a trained model and its decoding as one ONNX file",
             """\
Write a trained model and its decoding as one ONNX graph that any ONNX runtime runs
(standard operators only; no fastcolor needed to run it).

Input 'L': float32 (N, 1, S, S), the Lab lightness in 0..100 at the network's input
size S = --size (default: the size the model was trained at); the batch size N is free.
Output 'ab': float32 (N, 2, S/4, S/4) for a Zhang model, (N, 2, S, S) for a fusion model:
the predicted a and b in Lab units at the NETWORK'S OUTPUT RESOLUTION. Resize ab to your
photo and join it with the photo's own L (README, section Export, shows how).
A Zhang model is decoded inside the graph with the annealed mean at --temperature
(softmax(logits / T) times the table of the 313 bin centres). A fusion model exports with
its backbone inside the graph. The file is written atomically; an existing one is
replaced only with --overwrite. Needs the packages onnx and onnxscript
(pip install 'fastcolor[onnx]').""",
             """\
examples:
  fastcolor export runs/zhang -o zhang.onnx
  fastcolor export runs/zhang/model.safetensors -o zhang256.onnx --size 256 --temperature 0.3
  fastcolor export colorization_release_v2-9b330a0b.pth -o eccv16.onnx   # the authors' weights, T = 1""")
    p.add_argument("weights", metavar="RUN_OR_WEIGHTS", help="run directory, model or checkpoint file (as --weights "
                   "of colorize)")
    p.add_argument("--output", "-o", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.add_argument("--temperature", "-T", type=_positive_float, default=None, metavar="T",
                   help="annealed-mean temperature of a Zhang model (default: the model's own: 0.38, the paper's; "
                        "1 for the authors' released weights)")
    p.add_argument("--size", type=_size, metavar="N", help="square input size of the graph, a multiple of 8 "
                   "(default: the model's training size)")
    p.add_argument("--opset", type=int, metavar="K",  # fastcolor.export's MIN_OPSET and DEFAULT_OPSET
                   help="ONNX opset to write, 16 or newer (default: 18)")
    p.add_argument("--model", choices=sorted(MODELS), help="with a folder of several runs: which kind to pick")
    p.add_argument("--backbone-weights", metavar="FILE",
                   help="fusion: local weights file for the backbone (a path stored in a weights file is never read)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="what was written as JSON on stdout (file, opset, input and "
                   "output shapes, temperature)")
    p.set_defaults(func=cmd_export)

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
            status = int((args.func(args, extra) if args.command == "bench" else args.func(args)) or EXIT_OK)
        sys.stdout.flush()  # here, so that a reader gone away is a BrokenPipeError below, not at exit
        return status
    except SystemExit as exc:  # --help, --version
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return _stdout_closed()
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    except BrokenPipeError:  # stdout's reader went away (`fastcolor ... | head`): stop quietly, as cat does
        return _stdout_closed()
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


def _stdout_closed() -> int:
    """Point stdout at /dev/null (the interpreter's last flush then has nowhere to fail) and return
    the status of a process stopped by SIGPIPE, as ``cat`` or ``git log`` end under ``| head``."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (tests): nothing to do
        pass
    return EXIT_BROKEN_PIPE


def _describe(exc: BaseException) -> tuple[int, str]:
    """(exit status, message) for an exception that reached :func:`main`."""
    if isinstance(exc, CLIError):
        return exc.code, str(exc)
    from fastcolor.backends import BackendUnavailable
    from fastcolor.colorize import MemoryLimitError, is_out_of_memory
    from fastcolor.data import ShardError, UnreadableImageError
    from fastcolor.io import DirectoryLockedError, DiskFullError

    if isinstance(exc, ShardError):  # a missing or damaged shard, named
        return EXIT_USAGE, str(exc)
    if isinstance(exc, DirectoryLockedError):  # names the directory and the owner's pid
        return EXIT_USAGE, str(exc)
    if isinstance(exc, DiskFullError):  # names the file, the space needed and the space free
        return EXIT_FAILURE, str(exc)
    if isinstance(exc, MemoryLimitError):  # says what needed how much, and what to do
        return EXIT_FAILURE, str(exc)
    if is_out_of_memory(exc):
        return EXIT_FAILURE, f"ran out of memory: {exc}"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        detail = f"{exc.strerror or 'no such file or directory'}: {exc.filename}" if exc.filename else str(exc)
        return EXIT_USAGE, detail
    if isinstance(exc, (ValueError, BackendUnavailable, PermissionError, UnreadableImageError)):
        return EXIT_USAGE, str(exc)
    return EXIT_FAILURE, f"{type(exc).__name__}: {exc}"


def _device(choice: str) -> str:
    """``--device``: auto picks cuda when there is a GPU; asking for cuda without one is an error."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {choice}: no CUDA device is available here (torch {torch.__version__}, "
                       f"built with CUDA {torch.version.cuda}); use --device cpu")
    return choice


# ----------------------------------------------------------------------------- colorize


def cmd_colorize(args) -> int:
    from fastcolor.app.colorize_files import colorize_files, plan_colorize
    from fastcolor.app.weights import load_weights, resolve_weights
    from fastcolor.colorize import decode_temperature

    t0 = time.perf_counter()
    weights = resolve_weights(args.weights, args.model)  # before any work: no weights, no point
    jobs, skipped, existing = plan_colorize(args.inputs, args.output, args.overwrite, args.skip_existing)
    for s in skipped:
        warn(f"skipping {s}")
    if not jobs:
        if existing and not skipped:
            if args.json:
                say(json.dumps({"command": "colorize", "written": [], "skipped": [], "existing": existing}, indent=2))
                return EXIT_OK
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
    from fastcolor.data import resolve_decode

    decode = resolve_decode(args.decode, device, [str(job.src) for job in jobs])  # "gpu": nvjpeg on the device
    if model.config["arch"] == "fusion" and args.temperature is not None:
        note("--temperature has no effect on a fusion model (it regresses ab directly)")
    late: list[str] = []

    def on_skip(msg: str) -> None:
        late.append(msg)
        warn(f"skipping {msg}")

    raced: list[Path] = []  # outputs another process wrote meanwhile, left alone (--skip-existing)
    with idle_cpu_threads(device, log=None, threads=args.threads):
        written = colorize_files(model, jobs, size, args.temperature, args.batch_size, args.overwrite,
                                 progress=not args.quiet, on_skip=on_skip, skip_existing=args.skip_existing,
                                 on_existing=raced.append,
                                 decode_device=device if decode == "gpu" else None)
    n_skip, existing = len(skipped) + len(late), existing + len(raced)
    if not written and existing and not n_skip:
        if not args.json:
            say(f"nothing to do: all {existing} outputs already exist (--skip-existing)")
            return EXIT_OK
    elif not written:
        raise CLIError(f"nothing was colorized: none of the {n_skip} input file(s) could be read")
    if args.json:  # stdout holds only this; the warnings went to stderr
        temperature = (args.temperature or decode_temperature(model)) if model.config["arch"] == "zhang" else None
        say(json.dumps({"command": "colorize", "written": [str(w) for w in written], "skipped": [*skipped, *late],
                        "existing": existing, "seconds": round(time.perf_counter() - t0, 3),
                        "arch": model.config["arch"], "size": size, "temperature": temperature, "device": device},
                       indent=2))
        return EXIT_OK
    if not args.quiet:
        where = written[0] if len(written) == 1 else Path(args.output)
        extra = f"; skipped {n_skip} unreadable" if n_skip else ""
        extra += f"; left {existing} existing" if existing else ""
        temp = f", T {args.temperature or decode_temperature(model):g}" if model.config["arch"] == "zhang" else ""
        say(f"colorized {len(written)} image(s) -> {where} in {time.perf_counter() - t0:.1f} s "
            f"({model.config['arch']} model, size {size}{temp}, {device}{extra})")
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


#: --flag dest -> TrainConfig field, for the hyper-parameters a recipe sets (--model, --loss and
#: --size are resolved on their own).
_HYPER_FLAGS = {name: name for name in HYPERPARAMETERS if name not in ("model", "loss", "image_size")}


def _rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _silent(msg: str = "") -> None:
    """What say/note become on ranks other than 0 under torchrun: only rank 0 speaks."""


def _train_config(args, data: Path, run: Path) -> tuple[TrainConfig, str]:
    """The TrainConfig of ``fastcolor train``: the recipe's values, each flag given on top; and the
    CLI name of the model."""
    from fastcolor.models import PRESETS
    from fastcolor.train import TrainConfig

    values = recipe_values(args.recipe)
    names = {v: k for k, v in MODELS.items()}
    model_name = args.model or names.get(values["model"], values["model"])
    config = dict(PRESETS[MODELS[model_name]])
    arch = config["arch"]
    default_loss = recipe_values(args.recipe, MODELS[model_name])["loss"]
    loss = default_loss if args.loss in (None, "auto") else args.loss
    if (arch == "fusion") != (loss == "mse"):
        raise CLIError(f"--loss {loss} does not fit --model {model_name}: use rebalanced or ce for Zhang models, "
                       f"mse for fusion models")
    size = args.size or values["image_size"]
    if size:
        config["input_size"] = size
    overrides = {}
    for dest, name in _HYPER_FLAGS.items():
        v = getattr(args, dest)
        if v is not None:
            overrides[name] = None if v == _NONE else (tuple(v) if isinstance(v, list) else v)
    tensorboard = None if args.tensorboard is None else (args.tensorboard or str(run / "tensorboard"))
    try:
        cfg = TrainConfig.from_recipe(
            args.recipe, data_dir=str(data), run_dir=str(run), model=config, loss=loss, image_size=size,
            classes=args.classes, seed=args.seed, workers=args.workers, resume=True, restart=args.restart,
            decode=args.decode,
            device=args.device, precision=args.precision, backbone_weights=args.backbone_weights,
            max_steps_per_epoch=args.max_steps_per_epoch, progress=not args.quiet, log_every=args.log_every,
            tensorboard=tensorboard, sync_bn=args.sync_bn, val_images=args.val_images, val_every=args.val_every,
            val_data=args.val_data, **overrides)
    except ValueError as exc:  # e.g. --epochs none without --max-steps: name the flag
        field = str(exc).split(" ", 1)[0].rstrip(":")
        flag = "--" + ({"image_size": "size", "prior_lam": "prior-lambda"}.get(field, field)).replace("_", "-")
        raise CLIError(f"{flag}: {exc}") from None
    return cfg, model_name


def _describe_config(cfg: TrainConfig) -> str:
    """The resolved hyper-parameters on one line, as they are recorded in train_config.json."""
    shown = {k: getattr(cfg, k) for k in HYPERPARAMETERS}
    shown["model"] = cfg.model if isinstance(cfg.model, str) else {k: v for k, v in cfg.model.items()
                                                                   if k != "backbone_weights"}
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in shown.items())


def cmd_train(args) -> int:
    import torch

    from fastcolor._extras import MissingExtraError
    from fastcolor.data import NoReadableImagesError
    from fastcolor.io import DiskFullError, check_unlocked
    from fastcolor.train import RUN_FILES, CheckpointError, check_device, checkpoint_meta, train

    main_rank = _rank() == 0
    say_, note_ = (say, note) if main_rank else (_silent, _silent)  # under torchrun only rank 0 speaks
    from fastcolor.data.shards import is_shard_source

    data, run = Path(args.data), Path(args.out)
    shards = is_shard_source(args.data)  # a folder of tar shards, or a pattern / URL of them
    if not data.is_dir() and not shards:
        why = "not a folder" if data.exists() else "no such folder"
        raise CLIError(f"DATA must be a folder of images or tar shards, got {args.data!r} ({why})")
    if run.resolve() == data.resolve() or data.resolve() in run.resolve().parents:
        raise CLIError(f"--out {args.out} is inside DATA {args.data}: its PNGs would be taken for training images; "
                       f"choose a run directory outside the data")
    try:  # before anything is written
        check_device(args.device)
    except ValueError as exc:
        raise CLIError(f"--device {args.device}: {str(exc).split(': ', 1)[-1]}") from None
    if args.sync_bn and not _device(args.device).startswith("cuda"):
        raise CLIError(f"--sync-bn: torch's SyncBatchNorm runs on CUDA devices only (torch {torch.__version__} "
                       f"refuses CPU tensors), got --device {args.device} on a machine "
                       f"{'with' if torch.cuda.is_available() else 'without'} a GPU; without --sync-bn every rank "
                       f"takes rank 0's BatchNorm statistics after each epoch")
    if run.exists() and not run.is_dir():
        raise CLIError(f"--out {args.out} exists and is not a folder; choose a run directory")
    if main_rank:
        check_unlocked(run, "training run")  # refuse early; train() holds the real lock
    cfg, model_name = _train_config(args, args.data if shards else data, run)  # a URL is no Path
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:  # say it before anything is done
        raise CLIError("--tensorboard: the tensorboard package is not installed; install it with "
                       "pip install 'fastcolor[tensorboard]'", EXIT_FAILURE)
    arch, loss = cfg.model["arch"], cfg.loss
    last = run / "last.safetensors"
    if args.restart:
        old = [name for name in RUN_FILES if (run / name).exists()]
        if old:
            note_(f"--restart: deleting the earlier run's {', '.join(old)} in {args.out}")
    elif last.exists():
        try:
            meta = checkpoint_meta(last)
        except CheckpointError as exc:
            raise _damaged_checkpoint(args, exc) from None
        if not args.resume:
            raise CLIError(f"{args.out} already holds a run (last completed epoch {meta['epoch']}); pass --resume to "
                           f"continue it, --restart to start a new run there, or choose another --out")
        note_(f"resuming {args.out} from its last checkpoint")
    elif args.resume:
        note_(f"nothing to resume in {args.out}: starting a new run")
    if arch == "fusion" and not args.backbone_weights:
        note_("the fusion backbone has random weights (none can be downloaded; --backbone-weights takes a local "
              "file): expect it to help little")
    if not args.quiet:
        note_(f"recipe {cfg.recipe}: {RECIPES[cfg.recipe].summary}")
        note_(f"settings: {_describe_config(cfg)} (recorded in {run / 'train_config.json'})")
    t0 = time.perf_counter()
    try:
        with idle_cpu_threads(_device(args.device), log=note_ if main_rank else None, threads=args.threads):
            res = train(cfg)
    except KeyboardInterrupt:
        if (run / "last.safetensors").is_file():
            note_(f"the last completed epoch is saved in {run / 'last.safetensors'}; continue with the same "
                  f"command and --resume")
        raise
    except MissingExtraError as exc:  # --tensorboard without the package: says which extra to install
        raise CLIError(f"--tensorboard: {exc}", EXIT_FAILURE) from exc
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
    if args.json:  # stdout holds only this (rank 0's); notes and progress went to stderr
        say_(json.dumps({"command": "train", "run_dir": str(run), "model": model_name, "loss": loss,
                         "recipe": cfg.recipe, "epochs_completed": res.epochs_completed,
                         "resumed_from_epoch": res.resumed_from_epoch, "stopped_early": res.stopped_early,
                         "best_epoch": res.best_epoch, "best_val_loss": res.best_val_loss, "keep_best": cfg.keep_best,
                         "seconds": round(time.perf_counter() - t0, 3), "epochs": new}, indent=2, default=str))
        return EXIT_OK
    if not new:
        say_(f"nothing to do: {args.out} already completed {res.epochs_completed} epoch(s) (epochs {cfg.epochs}, "
             f"max_steps {cfg.max_steps})")
        return EXIT_OK
    for h in new:
        if not args.quiet:
            say_(f"epoch {h['epoch']:3d}  train {h['train_loss']:.4f}  val {h['val_loss']:.4f}"
                 f"{'  best' if h['best'] else ''}  ({h['seconds']:.1f} s)")
    stop = " (stopped early)" if res.stopped_early else ""
    kept = "best validation loss" if cfg.keep_best else "final weights kept; best validation loss"
    say_(f"trained {model_name} ({loss} loss, recipe {cfg.recipe}) for {res.epochs_completed} epoch(s){stop} in "
         f"{time.perf_counter() - t0:.0f} s; {kept} {res.best_val_loss:.4f} at epoch {res.best_epoch}")
    say_(f"run directory: {run}  (model.safetensors, loss_curve.png, metrics.jsonl)")
    say_(f"next: fastcolor eval {run} {'IMAGES/' if shards else data}")  # eval reads image folders, not shards
    say_(f"      fastcolor colorize IMAGES... -o colorized/ --weights {run}")
    return EXIT_OK


# ----------------------------------------------------------------------------- eval


def _eval_one(args, weights: str, data: Path, out: Path | None) -> dict:
    """:func:`fastcolor.metrics.evaluate` of one run as the options say (its own split where DATA is its data)."""
    from fastcolor.app.weights import resolve_weights, split_matches_data
    from fastcolor.data import NoReadableImagesError
    from fastcolor.metrics import evaluate

    if not Path(weights).exists() and not Path(weights).is_symlink():  # a link loop: resolve_weights names it
        raise CLIError(f"no such run directory or weights file: {weights}")
    model_file = resolve_weights(weights, arg="RUN_DIR_or_WEIGHTS")  # eval's own argument names
    compare = str(resolve_weights(args.compare, arg="--compare")) if args.compare else None
    run_dir = model_file.parent
    out = out if out is not None else run_dir / "eval"
    device = _device(args.device)
    use_split = "all" not in args.split and split_matches_data(run_dir, data)
    if "all" not in args.split and (run_dir / "split.json").is_file() and not use_split:
        note(f"{args.data} is not the data {run_dir} was trained on: evaluating every image in it (split 'all')")
    try:
        with idle_cpu_threads(device, log=None, threads=args.threads):
            return evaluate(model_file, data, out_dir=out, splits=args.split if use_split else ("all",),
                            compare=compare, T=args.temperature, batch_size=args.batch_size, device=device,
                            max_images=args.max_images, backbone_weights=args.backbone_weights,
                            target_reduction=args.target_reduction, decode=args.decode)
    except NoReadableImagesError as exc:
        raise _no_images(args, exc) from exc


def _eval_runs(args, data: Path) -> int:
    """Several runs: each evaluated on its own split, their rows joined into one study table per kind of model."""
    from fastcolor.app.weights import resolve_weights
    from fastcolor.io import atomic_write_json, atomic_write_text
    from fastcolor.metrics import study_rows, study_table

    if args.compare:
        raise CLIError("--compare takes one run beside one RUN_DIR; with several runs, list them all (the Zhang and "
                       "the fusion runs): their study tables are joined per kind of model")
    for w in args.weights:  # every run exists before any is evaluated
        if not Path(w).exists() and not Path(w).is_symlink():  # a link loop: resolve_weights names it
            raise CLIError(f"no such run directory or weights file: {w}")
    runs = [resolve_weights(w, arg="RUN_DIR_or_WEIGHTS").parent for w in args.weights]
    root = Path(args.out) if args.out else Path(os.path.commonpath([r.resolve() for r in runs])) / "eval"
    rows: dict[str, list[dict]] = {}
    seen: dict[tuple[str, str, str], Path] = {}
    reports, names = [], set()
    for w, run in zip(args.weights, runs, strict=True):
        name, i = run.name, 1
        while name in names:
            i += 1
            name = f"{run.name}-{i}"
        names.add(name)
        report = _eval_one(args, w, data, root / name)
        arch = report["models"]["model"]["arch"]
        for r in report["rows"]:
            if r["class"] == "(all)":
                continue
            key = (arch, r["class"], r["split"])
            if key in seen:
                raise CLIError(f"class {r['class']!r} ({r['split']}) is evaluated by two {arch} runs, {seen[key]} and "
                               f"{run}: give one run per class (e.g. trained with --class {r['class']})")
            seen[key] = run
            rows.setdefault(arch, []).append({**r, "run": str(run)})
        reports.append({"run": str(run), "arch": arch, "files": report["files"]})
    order = sorted(rows, key=lambda a: a != "zhang")  # Zhang's table first, as in the study
    study = {arch: study_rows(rows[arch], arch) for arch in order}
    md = ["# The seed study's tables, joined over the runs\n\n"]
    for arch in order:
        md.append(f"## {arch} ({len({r['run'] for r in rows[arch]})} runs; per class, then the mean of the classes)"
                  f"\n\n{study_table(rows[arch], arch)}\n")
    files = {"markdown": str(atomic_write_text(root / "study.md", "".join(md))),
             "json": str(atomic_write_json(root / "study.json", {"study": study, "runs": reports}))}
    if args.json:
        say(json.dumps({"study": study, "runs": reports, "files": files}, indent=2, sort_keys=True, default=str))
    else:
        say("".join(md).rstrip())
    note(f"wrote {', '.join(files.values())} (each run's own tables: {root}/<run>/metrics.md)")
    return EXIT_OK


def cmd_shard(args) -> int:
    from fastcolor.data.shards import SHARD_INDEX, write_shards

    data, out = Path(args.data), Path(args.out)
    if not data.is_dir():
        raise CLIError(f"DATA must be a folder of images, got {args.data!r} "
                       f"({'not a folder' if data.exists() else 'no such folder'})")
    if out.resolve() == data.resolve() or data.resolve() in out.resolve().parents:
        raise CLIError(f"OUT {args.out} is inside DATA {args.data}; choose a folder outside the data")
    index = write_shards(data, out, args.images_per_shard, seed=args.seed, fractions=tuple(args.split),
                         classes=args.classes, progress=not args.quiet)
    counts = {k: (len(v), sum(e["images"] for e in v)) for k, v in index["splits"].items()}
    note(f"wrote {', '.join(f'{n} {k} shard(s) ({i} images)' for k, (n, i) in counts.items())} and "
         f"{out / SHARD_INDEX}, {len(index['classes'])} class(es)")
    return EXIT_OK


def cmd_eval(args) -> int:
    data = Path(args.data)
    if not data.is_dir():
        raise CLIError(f"DATA must be a folder of images, got {args.data!r}")
    if len(args.weights) > 1:
        return _eval_runs(args, data)
    report = _eval_one(args, args.weights[0], data, Path(args.out) if args.out else None)
    if args.json:
        say(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        say(Path(report["files"]["markdown"]).read_text().rstrip())
    note(f"wrote {', '.join(report['files'].values())}")
    return EXIT_OK


# ----------------------------------------------------------------------------- bench / demo / info


def cmd_bench(args, extra: Sequence[str] = ()) -> int:
    from fastcolor.app import bench

    device = _device(args.device)
    argv = ["--device", device, *(["--train-step"] if args.train_step else []), *(["--loader"] if args.loader else []),
            *(["--data", args.data] if args.data else []), *extra]
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
    from fastcolor.app.demo import run_demo

    device = _device(args.device)
    run_demo(args.out, quick=args.quick, device=device, seed=args.seed, held_out=args.hold_out)
    return EXIT_OK


def cmd_info(args) -> int:
    from fastcolor.app.info import info_dict

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
    c = info.get("numba_cache")
    if c:
        state = ("warm" if c["warm"] else f"cold: {len(c['cached'])} of {c['kernels']} kernels compiled there, "
                 f"the first op compiles the rest") if c["enabled"] else f"off: {one_line(c['problem'] or '?', 160)}"
        say(f"numba cache: {c['dir']} ({state}; chosen by {c['chosen_by']})")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
