"""ONNX export (fastcolor.export, `fastcolor export`): the graph run by onnxruntime on the CPU
against the PyTorch model + fastcolor.annealed_mean, a dynamic batch axis, only default-domain
ONNX operators, fusion models, the command line, and the README's onnxruntime-only lines."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fastcolor
from fastcolor.export import ColorizerGraph, export_onnx
from fastcolor.models import PRESETS, FusionNet, ZhangNet, build_model
from fastcolor.models.serialization import save_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # the graphs' input size: small, so that each export takes seconds


def _zhang_small(seed: int = 0) -> ZhangNet:
    """The zhang_small preset at 32 x 32, its classifier scaled up so that the logits spread over
    several units and the temperature visibly matters (random init gives near-uniform ones)."""
    torch.manual_seed(seed)
    net = build_model({**PRESETS["zhang_small"], "input_size": SIZE})
    with torch.no_grad():
        net.classifier.weight.mul_(40.0)
    return net


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _L(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, SIZE, SIZE, generator=g) * 100.0


@pytest.fixture(scope="module")
def zhang_export(tmp_path_factory):
    net = _zhang_small()
    net.train()  # export must use eval mode and give the mode back
    path = export_onnx(net, tmp_path_factory.mktemp("onnx") / "zhang.onnx", T=0.38)
    assert net.training
    return net.eval(), path


@pytest.mark.parametrize("batch", [1, 3])
def test_zhang_graph_matches_annealed_mean(zhang_export, batch):
    net, path = zhang_export
    L = _L(batch, seed=batch)
    (ab,) = _session(path).run(["ab"], {"L": L.numpy()})
    with torch.no_grad():
        logits = net(L)
        ref = fastcolor.annealed_mean(logits, T=0.38)
    assert ab.shape == (batch, 2, SIZE // 4, SIZE // 4) and ab.dtype == np.float32
    assert float(ref.abs().max()) > 10.0  # a coloured prediction, not ~0 everywhere
    assert np.abs(ab - ref.numpy()).max() < 1e-3
    # the temperature is really in the graph: T = 1 decodes differently by far more than the tolerance
    assert np.abs(ab - fastcolor.annealed_mean(logits, T=1.0).numpy()).max() > 0.5


def test_graph_has_only_default_onnx_operators_and_a_dynamic_batch(zhang_export):
    _, path = zhang_export
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    domains = {n.domain for n in model.graph.node} | {o.domain for o in model.opset_import}
    assert domains <= {"", "ai.onnx"}, f"non-default operator domains in the graph: {domains}"
    assert not model.functions  # no local functions (where a custom op could hide)
    ops = {n.op_type for n in model.graph.node}
    assert {"Softmax", "MatMul"} <= ops and not any("fastcolor" in op.lower() for op in ops)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert inp.name == "L" and out.name == "ab"
    assert isinstance(dims(inp)[0], str) and dims(inp)[1:] == [1, SIZE, SIZE]
    assert dims(out)[0] == dims(inp)[0] and dims(out)[1:] == [2, SIZE // 4, SIZE // 4]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["arch"] == "zhang" and meta["input_size"] == str(SIZE) and float(meta["temperature"]) == 0.38


def test_mode_decoding_below_T_MODE(tmp_path):
    torch.manual_seed(1)
    net = ZhangNet.tiny(input_size=SIZE).eval()
    with torch.no_grad():
        net.classifier.weight.mul_(40.0)
    T = fastcolor.reference.T_MODE / 10
    path = export_onnx(net, tmp_path / "mode.onnx", T=T)
    L = _L(3, seed=5)
    (ab,) = _session(path).run(["ab"], {"L": L.numpy()})
    with torch.no_grad():
        ref = fastcolor.annealed_mean(net(L), T=T)  # the centre of the most likely bin
    assert np.abs(ab - ref.numpy()).max() < 1e-3
    assert "ArgMax" in {n.op_type for n in onnx.load(str(path)).graph.node}


def test_fusion_model_exports_with_its_backbone(tmp_path):
    # resnet18 rather than fusion_tiny's mobilenet_v3_small: any torchvision backbone goes into the
    # graph the same way, and resnet18's ~70 operators export in half the time of mobilenet's ~150
    torch.manual_seed(0)
    net = build_model({**PRESETS["fusion_tiny"], "input_size": SIZE, "backbone": "resnet18", "embed_size": SIZE}).eval()
    path = export_onnx(net, tmp_path / "fusion.onnx")
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    sess = _session(path)
    for batch in (1, 3):
        L = _L(batch, seed=10 + batch)
        (ab,) = sess.run(["ab"], {"L": L.numpy()})
        with torch.no_grad():
            ref = net(L) * 128.0  # its own embedding from L, inside the graph too
        assert ab.shape == (batch, 2, SIZE, SIZE)
        assert np.abs(ab - ref.numpy()).max() < 1e-3


def test_fusion_model_without_backbone_is_refused(tmp_path):
    net = FusionNet(input_size=SIZE, width=0.125, backbone=None, embed_dim=16)
    with pytest.raises(ValueError, match="without its backbone"):
        export_onnx(net, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 12}, "size must be a positive multiple of 8, got 12"),
    ({"T": 0.0}, "T must be a finite number > 0, got 0.0"),
    ({"T": float("nan")}, "T must be a finite number > 0"),
    ({"opset": 15}, "opset must be from 16 to"),
    ({"opset": 10_000}, "opset must be from 16 to"),
])
def test_bad_arguments_are_refused_by_name(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        export_onnx(ZhangNet.tiny(), tmp_path / "x.onnx", **kwargs)
    assert not (tmp_path / "x.onnx").exists()


def test_not_a_colorizer_is_refused(tmp_path):
    with pytest.raises(TypeError, match="model must be a fastcolor ZhangNet or FusionNet"):
        export_onnx(torch.nn.Conv2d(1, 313, 1), tmp_path / "x.onnx")


def test_missing_onnxscript_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    from fastcolor.monitor import MissingExtraError

    with pytest.raises(MissingExtraError, match=re.escape("onnxscript, which are not installed: pip install "
                                                          "'fastcolor[onnx]'")):
        export_onnx(ZhangNet.tiny(), tmp_path / "x.onnx")


def test_colorizer_graph_is_the_decoded_model():
    # the module that is exported, in PyTorch: the same numbers as the model + annealed_mean
    net = _zhang_small(seed=2).eval()
    L = _L(2, seed=3)
    with torch.no_grad():
        got = ColorizerGraph(net, T=0.5)(L)
        ref = fastcolor.annealed_mean(net(L), T=0.5)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- command line


def test_cli_round_trip_honours_the_models_own_temperature(tmp_path, capsys):
    from fastcolor.app.cli import main

    torch.manual_seed(0)
    # decode_temperature 1.0: as the authors' released weights load (fastcolor.models.released)
    net = ZhangNet(base=8, mid_width=16, mid_dilations=(2,), input_size=SIZE, decode_temperature=1.0)
    with torch.no_grad():
        net.classifier.weight.mul_(40.0)
    weights = save_model(tmp_path / "model.safetensors", net)
    out = tmp_path / "tiny.onnx"
    assert main(["export", str(weights), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"(N, 1, {SIZE}, {SIZE})" in said and "T = 1" in said
    L = _L(3, seed=7)
    (ab,) = _session(out).run(["ab"], {"L": L.numpy()})
    net.eval()
    with torch.no_grad():
        logits = net(L)
    assert np.abs(ab - fastcolor.annealed_mean(logits, T=1.0).numpy()).max() < 1e-3
    assert np.abs(ab - fastcolor.annealed_mean(logits, T=0.38).numpy()).max() > 0.5

    before = out.read_bytes()
    assert main(["export", str(weights), "-o", str(out)]) == 2  # never replaced without --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["export", str(weights), "-o", str(tmp_path / "x.onnx"), "--opset", "5"]) == 2
    assert "--opset must be from 16" in capsys.readouterr().err
    assert main(["export", str(weights), "-o", str(tmp_path / "x.txt")]) == 2
    assert "must be a file name ending in .onnx" in capsys.readouterr().err


def test_cli_refuses_a_fusion_model_without_backbone(tmp_path, capsys):
    from fastcolor.app.cli import main

    weights = save_model(tmp_path / "f.safetensors", FusionNet(input_size=SIZE, width=0.125, backbone=None,
                                                                embed_dim=16))
    assert main(["export", str(weights), "-o", str(tmp_path / "f.onnx")]) == 2
    err = capsys.readouterr().err
    assert "without its backbone" in err and "fastcolor: error:" in err
    assert not (tmp_path / "f.onnx").exists()


def test_cli_json_summary_and_its_own_argument_names(tmp_path, capsys):
    from fastcolor.app.cli import main

    torch.manual_seed(0)
    weights = save_model(tmp_path / "model.safetensors", ZhangNet(base=8, mid_width=16, mid_dilations=(2,),
                                                                  input_size=SIZE))
    out = tmp_path / "z.onnx"
    assert main(["export", str(weights), "-o", str(out), "--json", "-T", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"command": "export", "file": str(out), "bytes": out.stat().st_size, "opset": 18,
                       "arch": "zhang", "temperature": 0.5,
                       "input": {"name": "L", "dtype": "float32", "shape": ["N", 1, SIZE, SIZE]},
                       "output": {"name": "ab", "dtype": "float32", "shape": ["N", 2, SIZE // 4, SIZE // 4]}}
    (ab,) = _session(out).run(["ab"], {"L": _L(1, seed=0).numpy()})
    assert ab.shape == (1, 2, SIZE // 4, SIZE // 4)
    # export takes its weights as the positional RUN_OR_WEIGHTS: its errors say so, not --weights
    (tmp_path / "empty").mkdir()
    for bad, said in ((tmp_path / "nope", "RUN_OR_WEIGHTS: no such file or directory"),
                      (tmp_path / "empty", f"RUN_OR_WEIGHTS {tmp_path / 'empty'}: not a run directory")):
        capsys.readouterr()
        assert main(["export", str(bad), "-o", str(tmp_path / "x.onnx")]) == 2
        err = capsys.readouterr().err
        assert said in err and "--weights" not in err, err


def test_cli_without_onnx_names_the_extra(tmp_path, capsys, monkeypatch):
    """Issue 22: the opset check imported onnx first, so this said only "No module named 'onnx'"."""
    import importlib.util

    from fastcolor.app.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    weights = save_model(tmp_path / "model.safetensors", ZhangNet.tiny())
    assert main(["export", str(weights), "-o", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert "needs the package(s) onnx, which are not installed: pip install 'fastcolor[onnx]'" in err, err
    assert not (tmp_path / "x.onnx").exists()


# ----------------------------------------------------------------------------- README


def _readme_export_code() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Export\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README section Export has no python code block"
    return blocks[0]


#: Runs the README's lines with fastcolor unimportable (every finder refuses it, whatever way it
#: is installed), after checking that it really cannot be imported.
_NO_FASTCOLOR = textwrap.dedent("""\
    import importlib.abc, sys
    class _Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "fastcolor" or name.startswith("fastcolor."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None
    sys.meta_path.insert(0, _Refuse())
    sys.path[:] = [p for p in sys.path if p not in ("", ".", REPO)]
    try:
        import fastcolor
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("fastcolor is still importable")
    exec(compile(open("readme_export.py").read(), "README.md (Export)", "exec"), {"__name__": "__main__"})
    assert "torch" not in sys.modules, "the README lines imported torch"
    """)


def test_readme_export_lines_colorize_a_photo_without_fastcolor(zhang_export, tmp_path):
    from PIL import Image
    from skimage import data

    from fastcolor.colorize import colorize_image

    net, path = zhang_export
    photo = data.chelsea()  # (300, 451, 3) uint8
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    (tmp_path / "model.onnx").write_bytes(path.read_bytes())
    (tmp_path / "readme_export.py").write_text(_readme_export_code())
    boot = _NO_FASTCOLOR.replace("REPO", repr(str(ROOT)))
    proc = subprocess.run([sys.executable, "-c", boot], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.asarray(Image.open(tmp_path / "photo_color.png"))
    assert out.shape == photo.shape and out.dtype == np.uint8
    # what fastcolor's own pipeline makes of the same photo with the same model and T
    ref = colorize_image(net, Image.open(tmp_path / "photo.jpg"), T=0.38)
    diff = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    # measured: 0.05 levels on average, 2 at most (skimage's Lab and resizing against kornia's and torch's)
    msg = f"README lines differ from colorize_image by {diff.mean():.2f} levels on average, {diff.max()} at most"
    assert diff.mean() < 0.5 and diff.max() <= 10, msg
    chroma = out.astype(np.int16).max(-1) - out.astype(np.int16).min(-1)
    assert chroma.mean() > 10  # coloured, not grey
