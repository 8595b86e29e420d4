"""``fastcolor export``: a trained model (run directory, model file, checkpoint or the authors'
released weights, as ``--weights`` takes them: :mod:`fastcolor.app.weights`) to one ONNX file
with :func:`fastcolor.export.export_onnx`."""
from __future__ import annotations

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


def cmd_export(args) -> int:
    """Resolve and load ``args.weights`` on the CPU, export it to ``args.output``, say what was written."""
    from fastcolor.app.weights import load_weights
    from fastcolor.colorize import decode_temperature
    from fastcolor.export import DEFAULT_OPSET, MIN_OPSET, export_onnx, max_opset

    path = _check_output(args.output, args.overwrite)
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    try:
        top = max_opset()
    except ImportError:  # no onnx: export_onnx below says which extra to install
        top = None
    if top is not None and not MIN_OPSET <= opset <= top:
        raise CLIError(f"--opset must be from {MIN_OPSET} to {top} (the newest the installed onnx knows), "
                       f"got {opset}")
    model = load_weights(args.weights, args.model, "cpu", args.backbone_weights)
    config = model.config
    if config.get("arch") == "fusion" and getattr(model, "embedder", None) is None:
        raise CLIError(f"--weights {args.weights}: this fusion model was built without its backbone, so its "
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
    decoding = f", annealed mean at T = {T:g}" if zhang else ""
    say(f"wrote {path} ({path.stat().st_size / (1 << 20):.1f} MiB, ONNX opset {opset}): input 'L' float32 "
        f"(N, 1, {size}, {size}) in 0..100, output 'ab' float32 (N, 2, {out}, {out}) in Lab units{decoding}; N is free")
    return EXIT_OK
