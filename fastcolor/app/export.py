"""``fastcolor export``: a trained model (run directory, model file, checkpoint or the authors'
released weights, as ``--weights`` takes them: :mod:`fastcolor.app.weights`) to one ONNX file
with :func:`fastcolor.export.export_onnx`."""
from __future__ import annotations

import json
from pathlib import Path

from fastcolor.app.messages import EXIT_FAILURE, EXIT_OK, CLIError, note, say

__all__ = ["cmd_export"]


def _check_output(output: str, overwrite: bool) -> Path:
    path = Path(output)
    if path.suffix.lower() != ".onnx":
        raise CLIError(f"-o/--output must be a file name ending in .onnx, got {output!r}")
    if path.is_dir():
        raise CLIError(f"-o/--output {output} is a directory; give the .onnx file to write")
    if path.exists() and not overwrite:
        raise CLIError(f"-o/--output {output} already exists; pass --overwrite to replace it")
    return path


#: How ``export`` names its weights argument in errors (a positional; it has no ``--weights``).
WEIGHTS_ARG = "RUN_OR_WEIGHTS"


def cmd_export(args) -> int:
    """Resolve and load ``args.weights`` on the CPU, export it to ``args.output``, say what was written
    (one line, or with ``args.json`` a JSON object on stdout)."""
    from fastcolor._extras import MissingExtraError
    from fastcolor.app.weights import load_weights
    from fastcolor.colorize import decode_temperature
    from fastcolor.export import DEFAULT_OPSET, MIN_OPSET, export_onnx, max_opset, require_exporter

    path = _check_output(args.output, args.overwrite)
    try:  # first: without onnx nothing else matters, and the opset check below imports it
        require_exporter()
    except MissingExtraError as exc:
        raise CLIError(str(exc), EXIT_FAILURE) from None
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise CLIError(f"--opset must be from {MIN_OPSET} to {top} (the newest the installed onnx knows), "
                       f"got {opset}")
    model = load_weights(args.weights, args.model, "cpu", args.backbone_weights, arg=WEIGHTS_ARG)
    config = model.config
    if config.get("arch") == "fusion" and getattr(model, "embedder", None) is None:
        raise CLIError(f"{WEIGHTS_ARG} {args.weights}: this fusion model was built without its backbone, so its "
                       f"embedding comes from outside the network and L alone cannot be one graph; "
                       f"export a fusion model that has its backbone")
    if args.temperature is not None and config.get("arch") == "fusion":
        note("--temperature has no effect on a fusion model (it regresses ab directly)")
    size = args.size or config.get("input_size")
    try:
        export_onnx(model, path, T=args.temperature, size=size, opset=opset)
    except ImportError as exc:
        raise CLIError(str(exc), EXIT_FAILURE) from exc
    zhang = config.get("arch") == "zhang"
    out = size // 4 if zhang else size
    T = args.temperature if args.temperature is not None else decode_temperature(model)
    if getattr(args, "json", False):
        say(json.dumps({"command": "export", "file": str(path), "bytes": path.stat().st_size, "opset": opset,
                        "arch": config.get("arch"), "temperature": T if zhang else None,
                        "input": {"name": "L", "dtype": "float32", "shape": ["N", 1, size, size]},
                        "output": {"name": "ab", "dtype": "float32", "shape": ["N", 2, out, out]}}, indent=2))
        return EXIT_OK
    decoding = f", annealed mean at T = {T:g}" if zhang else ""
    say(f"wrote {path} ({path.stat().st_size / (1 << 20):.1f} MiB, ONNX opset {opset}): input 'L' float32 "
        f"(N, 1, {size}, {size}) in 0..100, output 'ab' float32 (N, 2, {out}, {out}) in Lab units{decoding}; N is free")
    return EXIT_OK
