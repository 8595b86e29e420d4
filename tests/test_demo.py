"""``fastcolor demo --quick``: the whole pipeline on tiny sizes, offline, in well under a minute."""
import json

import numpy as np
import skimage.data
from PIL import Image

from fastcolor.app.cli import main


def test_quick_demo_writes_every_artefact(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "not a good colorizer" in printed and "RANDOM weights" in printed
    for name in ("comparison.png", "loss_curves.png", "metrics.md", "metrics.json", "bench.md",
                 "coffee_zhang.png", "coffee_fusion.png", "runs/zhang-small/model.safetensors",
                 "runs/fusion-small/model.safetensors", "eval/heldout/metrics.md", "eval/test/comparison.png"):
        assert (out / name).is_file(), name
        assert str(out / name.split("/")[0]) in printed or name.startswith(("runs/", "eval/")), name
    # the held-back photo was never trained on, and is colorized at its full resolution
    assert not (out / "data" / "coffee").exists() and (out / "data" / "chelsea").is_dir()
    truth = skimage.data.coffee()
    for model in ("zhang", "fusion"):
        with Image.open(out / f"coffee_{model}.png") as im:
            assert im.size == (truth.shape[1], truth.shape[0])
            assert np.asarray(im).std() > 5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["held_out_photo"] == "coffee"
    held = {r["split"] for r in metrics["heldout"]["rows"]}
    assert held == {"all"}
    md = (out / "metrics.md").read_text()
    assert "Zhang (zhang-small)" in md and "fusion (fusion-small)" in md and "AuC" in md
    bench = (out / "bench.md").read_text()
    assert "torch ms" in bench or "benchmark not run" in bench
