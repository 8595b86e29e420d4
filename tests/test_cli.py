"""The ``fastcolor`` command line, run in-process through ``main(argv)`` (two real subprocesses).

Images are NOT the demo's (scikit-image colour photos at 32/64 px): scikit-learn's sample
photos, skimage's grayscale camera and a generated RGBA image, at other sizes.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2lab

from fastcolor.app import colorize_files
from fastcolor.app.cli import main
from fastcolor.app.messages import CLIError

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def _sample(name: str) -> np.ndarray:
    images = sklearn_datasets.load_sample_images()
    return next(img for img, f in zip(images.images, images.filenames, strict=True) if f.endswith(name))


def run(capsys, *argv):
    """(exit status, stdout, stderr) of ``fastcolor argv...`` run in-process."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *fragments, code=2):
    assert rc == code, err
    # notes and warnings ("fastcolor: warning: ...", "fastcolor: the machine is busy ...") aside
    lines = [ln for ln in err.splitlines()
             if ln.strip() and (ln.startswith("fastcolor: error:") or not ln.startswith("fastcolor: "))]
    assert len(lines) == 1, err
    assert lines[0].startswith("fastcolor: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, err)


def _lightness(path) -> np.ndarray:
    """L of the colour channels (straight colour: alpha, if any, is not applied)."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGBA"))[..., :3]
    return rgb2lab(a / 255.0)[..., 0]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A tiny two-class folder: 48 px crops of scikit-learn's china.jpg and flower.jpg."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for name in ("china", "flower"):
        img = _sample(f"{name}.jpg")
        (root / name).mkdir()
        for j in range(5):
            s = int(rng.integers(150, 400))
            y, x = rng.integers(0, img.shape[0] - s), rng.integers(0, img.shape[1] - s)
            Image.fromarray(img[y:y + s, x:x + s]).resize((48, 48)).save(root / name / f"{name}_{j}.png")
    return root


@pytest.fixture(scope="module")
def run_dir(photos, tmp_path_factory):
    """A zhang-tiny run trained through the CLI for one epoch at size 48."""
    run = tmp_path_factory.mktemp("runs") / "zhang"
    rc = main(["train", str(photos), "--model", "zhang-tiny", "--epochs", "1", "--batch-size", "4",
               "--size", "48", "--workers", "0", "--out", str(run), "-q"])
    assert rc == 0
    return run


@pytest.fixture(scope="module")
def fusion_weights(tmp_path_factory):
    """An untrained fusion-tiny model file (the colorize path does not care about quality)."""
    from fastcolor.models import build_model
    from fastcolor.models.serialization import save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fusion") / "fusion" / "model.safetensors"
    path.parent.mkdir()
    save_model(path, build_model({"arch": "fusion", "input_size": 40, "width": 0.125,
                                  "backbone": "mobilenet_v3_small", "embed_size": 32}))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Photos unlike the demo's: a colour JPEG, a grayscale PNG and an RGBA PNG, odd sizes."""
    import skimage.data

    root = tmp_path_factory.mktemp("inputs")
    Image.fromarray(_sample("flower.jpg")[:301, :417]).save(root / "flower.jpg", quality=95)
    Image.fromarray(skimage.data.camera()[:203, :251]).save(root / "camera.png")
    rgb = _sample("china.jpg")[100:177, 200:323]
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:20] = 0
    alpha[:, :15] = 90
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(root / "logo.png")
    return root


# ----------------------------------------------------------------------------- help / info


@pytest.mark.parametrize("command", [None, "colorize", "train", "eval", "bench", "demo", "info"])
def test_every_command_has_help_with_examples(capsys, command):
    rc, out, _ = run(capsys, *([command] if command else []), "--help")
    assert rc == 0
    assert out.startswith("usage: fastcolor") and "examples:" in out
    if command:
        assert f"fastcolor {command}" in out.split("examples:")[1]


def test_no_command_and_unknown_options_are_usage_errors(capsys):
    rc, _, err = run(capsys)
    assert rc == 2 and "fastcolor: error: a command is required" in err
    assert_one_line_error(*run(capsys, "colorize", "x.png", "-o", "y", "--colour")[::2],
                          "unrecognized arguments: --colour")
    assert_one_line_error(*run(capsys, "colorize", "x.png", "-o", "y", "--size", "30")[::2], "multiple of 8")
    for bad in ("inf", "0", "nan", "-1"):  # -T inf is refused like -T 0 (issue 13)
        assert_one_line_error(*run(capsys, "colorize", "x.png", "-o", "y", "-T", bad)[::2],
                              f"expected a positive finite number, got '{bad}'")


def test_info_lists_backends_per_device(capsys):
    rc, out, _ = run(capsys, "info")
    assert rc == 0 and "fastcolor 0." in out and "cpu" in out and "cuda" in out and "auto ->" in out
    rc, out, _ = run(capsys, "info", "--json")
    info = json.loads(out)
    assert info["devices"]["cpu"]["backends"]["torch"]["available"] is True
    assert info["devices"]["cpu"]["auto"] in info["devices"]["cpu"]["auto_order"]
    assert "extension" in info["build_info"]


def test_module_and_console_script_run_as_processes(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "fastcolor", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0 and "usage: fastcolor" in p.stdout
    exe = shutil.which("fastcolor", path=str(Path(sys.executable).parent)) or shutil.which("fastcolor")
    if exe is None:
        pytest.skip("the fastcolor console script is not installed (pip install -e .)")
    p = subprocess.run([exe, "colorize", str(tmp_path / "photo.png"), "-o", str(tmp_path / "o.png")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, "no trained weights", "fastcolor train", "--weights")
    assert p.stdout == ""


# ----------------------------------------------------------------------------- colorize


def test_colorize_keeps_size_lightness_and_alpha(capsys, run_dir, inputs, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "colorize", inputs, "-o", out, "--weights", run_dir, "--size", "40",
                          "--batch-size", "2")
    assert rc == 0, err
    assert "colorized 3 image(s)" in stdout
    for name in ("flower.jpg", "camera.png", "logo.png"):
        with Image.open(inputs / name) as src, Image.open(out / name) as dst:
            assert dst.size == src.size, name
            assert dst.mode == ("RGBA" if name == "logo.png" else "RGB"), name
        dL = np.abs(_lightness(out / name) - _lightness(inputs / name))
        # L is the input's own; only uint8 rounding, gamut clipping and JPEG re-encoding move it
        assert dL.mean() < (0.6 if name.endswith(".jpg") else 0.4) and np.percentile(dL, 99) < 3, (name, dL.mean())
    alpha_in = np.asarray(Image.open(inputs / "logo.png"))[..., 3]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "logo.png"))[..., 3], alpha_in)
    # an image with colour: a grayscale input really got some colour
    rgb = np.asarray(Image.open(out / "camera.png")).astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 0.5
    assert not list(out.glob(".*")), "no temp files left behind"


def test_colorize_single_file_to_file_with_fusion_model(capsys, fusion_weights, inputs, tmp_path):
    dst = tmp_path / "deep" / "er" / "camera_colour.webp"
    rc, stdout, err = run(capsys, "colorize", inputs / "camera.png", "-o", dst, "--weights", fusion_weights)
    assert rc == 0, err
    with Image.open(dst) as im:
        assert im.format == "WEBP" and im.size == (251, 203)
    assert "fusion model, size 40" in stdout


def test_refuses_to_overwrite_without_overwrite(capsys, run_dir, inputs, tmp_path):
    dst = tmp_path / "c.png"
    assert run(capsys, "colorize", inputs / "camera.png", "-o", dst, "--weights", run_dir)[0] == 0
    before = dst.read_bytes()
    rc, _, err = run(capsys, "colorize", inputs / "camera.png", "-o", dst, "--weights", run_dir, "-T", "0.05")
    assert_one_line_error(rc, err, "already exists", "--overwrite")
    assert dst.read_bytes() == before
    rc, out, _ = run(capsys, "colorize", inputs / "camera.png", "-o", dst, "--weights", run_dir, "--skip-existing")
    assert rc == 0 and "nothing to do" in out and dst.read_bytes() == before
    assert run(capsys, "colorize", inputs / "camera.png", "-o", dst, "--weights", run_dir, "-T", "0.05",
               "--overwrite")[0] == 0
    assert dst.read_bytes() != before
    assert oct(dst.stat().st_mode & 0o777) != oct(0o600), "outputs are created with the usual permissions"


def test_no_clobber_write_loses_a_race_safely(tmp_path):
    dst = tmp_path / "x.png"
    dst.write_bytes(b"someone else's")
    with pytest.raises(CLIError, match="appeared while colorizing"):
        colorize_files.write_new_file(dst, b"ours", overwrite=False)
    assert dst.read_bytes() == b"someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_bad_paths_and_missing_weights_are_one_line_errors(capsys, run_dir, inputs, tmp_path):
    out = tmp_path / "o"
    assert_one_line_error(*run(capsys, "colorize", tmp_path / "nope.jpg", "-o", out, "--weights", run_dir)[::2],
                          "no such file or directory", "nope.jpg")
    assert_one_line_error(*run(capsys, "colorize", inputs, "-o", out, "--weights", tmp_path / "nope")[::2],
                          "--weights", "no such file")
    assert_one_line_error(*run(capsys, "colorize", inputs, "-o", out)[::2], "fastcolor train", "--weights")
    garbage = tmp_path / "w.safetensors"
    garbage.write_bytes(b"\0" * 64)
    assert_one_line_error(*run(capsys, "colorize", inputs, "-o", out, "--weights", garbage)[::2],
                          "not a fastcolor model")
    assert_one_line_error(*run(capsys, "colorize", inputs, "-o", out, "--weights", run_dir, "--model", "fusion")[::2],
                          "holds a zhang model")
    assert_one_line_error(*run(capsys, "colorize", inputs, "-o", inputs, "--weights", run_dir)[::2],
                          "is the input folder")
    assert not out.exists()


def test_weights_folder_of_runs_is_picked_by_model(capsys, run_dir, fusion_weights, inputs, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "zhang")
    shutil.copytree(fusion_weights.parent, runs / "fusion")
    rc, _, err = run(capsys, "colorize", inputs / "camera.png", "-o", tmp_path / "a.png", "--weights", runs)
    assert_one_line_error(rc, err, "several runs", "--model")
    rc, out, err = run(capsys, "colorize", inputs / "camera.png", "-o", tmp_path / "a.png", "--weights", runs,
                       "--model", "fusion-tiny")
    assert rc == 0 and "fusion model" in out, err


def test_corrupt_files_are_skipped_or_fatal_when_alone(capsys, run_dir, inputs, tmp_path):
    bad = tmp_path / "in" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a JPEG " * 50)
    rc, _, err = run(capsys, "colorize", bad, "-o", tmp_path / "o1", "--weights", run_dir)
    assert_one_line_error(rc, err, "nothing was colorized")
    assert "broken.jpg" in err  # the warning names it
    shutil.copy(inputs / "camera.png", bad.parent / "camera.png")
    truncated = bad.parent / "truncated.png"
    truncated.write_bytes((inputs / "logo.png").read_bytes()[:300])  # a valid header, then nothing
    rc, out, err = run(capsys, "colorize", bad.parent, "-o", tmp_path / "o2", "--weights", run_dir)
    assert rc == 0, err
    assert "fastcolor: warning: skipping" in err and "broken.jpg" in err and "truncated.png" in err
    assert "colorized 1 image(s)" in out and "skipped 2 unreadable" in out
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["camera.png"]


def test_debug_shows_the_traceback(capsys, tmp_path):
    rc, _, err = run(capsys, "--debug", "colorize", tmp_path / "nope.png", "-o", tmp_path / "o")
    assert rc == 2 and "Traceback (most recent call last)" in err and "fastcolor: error:" in err
    rc, _, err = run(capsys, "colorize", tmp_path / "nope.png", "-o", tmp_path / "o", "--debug")
    assert rc == 2 and "Traceback" in err


def test_out_of_memory_is_an_error_and_writes_nothing(capsys, run_dir, inputs, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(colorize_files, "predict_ab", oom)
    rc, _, err = run(capsys, "colorize", inputs, "-o", tmp_path / "o", "--weights", run_dir)
    assert_one_line_error(rc, err, "ran out of", "memory", "--batch-size", "nothing was written", code=1)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ----------------------------------------------------------------------------- train / eval / bench


def test_train_wrote_a_run_and_guards_it(capsys, photos, run_dir):
    for f in ("model.safetensors", "last.safetensors", "split.json", "metrics.jsonl", "loss_curve.png"):
        assert (run_dir / f).is_file(), f
    from fastcolor.models.serialization import load_model

    assert load_model(run_dir).config["input_size"] == 48  # --size is recorded in the model
    argv = ["train", photos, "--model", "zhang-tiny", "--epochs", "1", "--workers", "0", "--out", run_dir, "-q"]
    assert_one_line_error(*run(capsys, *argv)[::2], "already holds a run", "--resume")
    rc, out, _ = run(capsys, *argv, "--resume")
    assert rc == 0 and "nothing to do" in out
    assert_one_line_error(*run(capsys, "train", photos, "--model", "fusion-tiny", "--loss", "ce", "--out",
                               run_dir.parent / "x")[::2], "--loss ce does not fit")
    assert_one_line_error(*run(capsys, "train", photos, "--out", photos / "run")[::2], "inside DATA")
    assert_one_line_error(*run(capsys, "train", photos / "nope", "--out", run_dir.parent / "y")[::2], "DATA")


def test_eval_prints_tables_and_json(capsys, photos, run_dir, inputs, tmp_path):
    rc, out, err = run(capsys, "eval", run_dir, photos, "--out", tmp_path / "ev")
    assert rc == 0, err
    assert "| class | split |" in out and "| china | train |" in out and "acc313" in out
    assert (tmp_path / "ev" / "metrics.json").is_file() and (tmp_path / "ev" / "comparison.png").is_file()
    rc, out, _ = run(capsys, "eval", run_dir, photos, "--json", "--split", "test", "--out", tmp_path / "ev2")
    report = json.loads(out)
    assert {r["split"] for r in report["rows"]} == {"test"}
    # a folder the run was not trained on: every image in it
    rc, out, err = run(capsys, "eval", run_dir / "model.safetensors", inputs, "--json", "--out", tmp_path / "ev3")
    assert rc == 0 and "evaluating every image" in err
    assert {(r["class"], r["split"], r["images"]) for r in json.loads(out)["rows"]} >= {("(all)", "all", 3)}
    assert str(run_dir / "model.safetensors") in (tmp_path / "ev3" / "metrics.md").read_text()
    assert_one_line_error(*run(capsys, "eval", tmp_path / "nope", photos)[::2], "no such run directory")


def test_bench_delegates_to_the_benchmark_driver(capsys):
    rc, out, err = run(capsys, "bench", "--device", "cpu", "--quick", "--providers", "torch", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert [p["provider"] for p in data["providers"]] == ["torch"]
    assert "| op |" in err  # the table goes to stderr when stdout is JSON


# ----------------------------------------------------------------------------- issue 22.9: --json, --threads, pipes


def test_colorize_and_train_json_summaries(capsys, photos, run_dir, inputs, tmp_path):
    rc, out, err = run(capsys, "colorize", inputs, "-o", tmp_path / "c", "--weights", run_dir, "--size", "40",
                       "--json")
    assert rc == 0, err
    summary = json.loads(out)  # stdout is the JSON object alone
    assert summary["command"] == "colorize" and summary["arch"] == "zhang" and summary["size"] == 40
    assert sorted(Path(p).name for p in summary["written"]) == ["camera.png", "flower.jpg", "logo.png"]
    assert all(Path(p).is_file() for p in summary["written"])
    assert summary["skipped"] == [] and summary["existing"] == 0 and summary["temperature"] == pytest.approx(0.38)
    rc, out, err = run(capsys, "colorize", inputs, "-o", tmp_path / "c", "--weights", run_dir, "--size", "40",
                       "--json", "--skip-existing")
    assert rc == 0, err
    assert json.loads(out) == {"command": "colorize", "written": [], "skipped": [], "existing": 3}

    rc, out, err = run(capsys, "train", photos, "--model", "zhang-tiny", "--epochs", "1", "--batch-size", "4",
                       "--size", "48", "--workers", "0", "--max-steps-per-epoch", "1", "--threads", "1",
                       "--out", tmp_path / "run", "--json")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["command"] == "train" and summary["run_dir"] == str(tmp_path / "run")
    assert summary["epochs_completed"] == 1 and [e["epoch"] for e in summary["epochs"]] == [0]
    assert summary["best_val_loss"] == pytest.approx(summary["epochs"][0]["val_loss"])
    assert summary["model"] == "zhang-tiny" and summary["resumed_from_epoch"] is None


def test_threads_overrides_the_idle_core_heuristic(capsys, monkeypatch):
    from fastcolor.app import threads

    monkeypatch.setattr(threads, "cpu_threads", lambda reserve=0: pytest.fail("the heuristic was consulted"))
    before = torch.get_num_threads()
    for device in ("cpu", "cuda"):
        with threads.idle_cpu_threads(device, threads=3):
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads: expected a positive int, got 0"):
        with threads.idle_cpu_threads("cpu", threads=0):
            pass
    for command in ("colorize", "train", "eval"):
        rc, out, _ = run(capsys, command, "--help")
        assert "--threads N" in out
    assert_one_line_error(*run(capsys, "colorize", "x.png", "-o", "y", "--threads", "0")[::2],
                          "--threads", "expected a positive integer, got '0'")


@pytest.mark.parametrize("argv", [["info", "--json"], ["--help"], ["--version"]])
def test_a_closed_stdout_ends_quietly(argv):
    """`fastcolor ... | head`: the reader goes away; no BrokenPipeError, no traceback, no message."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    try:
        p = subprocess.run([sys.executable, "-m", "fastcolor", *argv], stdout=write, stderr=subprocess.PIPE,
                           text=True, timeout=240, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    finally:
        os.close(write)
    assert "BrokenPipe" not in p.stderr and "Traceback" not in p.stderr and "Exception ignored" not in p.stderr
    assert p.stderr == ""
    assert p.returncode in (0, 141)  # argparse drops its own failed writes (--help); a command stops with 141
    if argv[0] == "info":
        assert p.returncode == 141


def test_eval_errors_name_evals_own_arguments(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "eval", tmp_path / "empty", tmp_path)
    assert_one_line_error(rc, err, f"RUN_DIR_or_WEIGHTS {tmp_path / 'empty'}: not a run directory")
    assert "--weights" not in err


def test_parser_literals_match_the_library():
    """The parser is built without importing torch (tests/test_import.py), so a few library
    constants are spelled out in it: they must stay equal."""
    from fastcolor.app.cli import build_parser
    from fastcolor.data import TARGET_REDUCTIONS
    from fastcolor.export import DEFAULT_OPSET, MIN_OPSET
    from fastcolor.models import PRESETS

    subs = next(a for a in build_parser()._actions if a.dest == "command").choices

    def action(command, dest):
        return next(a for a in subs[command]._actions if a.dest == dest)

    for command in ("train", "eval"):
        assert tuple(action(command, "target_reduction").choices) == tuple(TARGET_REDUCTIONS)
    assert action("export", "opset").help == f"ONNX opset to write, {MIN_OPSET} or newer (default: {DEFAULT_OPSET})"
    assert set(action("colorize", "model").choices) <= {k.replace("_", "-") for k in PRESETS}
