"""Models in the Hugging Face Hub layout (issue 22.8): ``save_pretrained`` writes ``model.safetensors``
and ``config.json``; ``load_model`` reads such a folder (fastcolor's, or another writer's with
plain-string safetensors metadata) and a Hub id through ``huggingface_hub`` when it is installed.

Offline: the Hub id tests stand a fake ``huggingface_hub`` module in (its ``snapshot_download``
returns a local folder, or fails as an offline one does), and hide the package to check the
message a machine without it gets.
"""
import json
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

import fastcolor as fc
from fastcolor.models import FusionNet, ZhangNet, model_state
from fastcolor.models.serialization import HUB_CONFIG, HUB_WEIGHTS, save_pretrained


def _same_weights(a, b):
    sa, sb = model_state(a), model_state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("make", [ZhangNet.tiny, FusionNet.tiny], ids=["zhang", "fusion"])
def test_save_pretrained_round_trip(tmp_path, make):
    torch.manual_seed(0)
    net = make()
    folder = save_pretrained(net, tmp_path / "hub" / "model")
    assert (folder / HUB_WEIGHTS).is_file() and json.loads((folder / HUB_CONFIG).read_text()) == net.config
    assert "library_name: fastcolor" in (folder / "README.md").read_text()
    back = fc.load_model(folder)
    assert back.config == net.config and not back.training and _same_weights(net, back)
    assert _same_weights(net, fc.load_model(folder / HUB_WEIGHTS))  # the weights file alone is a fastcolor model


def test_an_existing_model_card_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("my card\n")
    save_pretrained(ZhangNet.tiny(), tmp_path)
    assert (tmp_path / "README.md").read_text() == "my card\n"


def test_another_writers_folder_loads_from_its_config_json(tmp_path):
    """As PyTorchModelHubMixin writes it: safetensors with {"format": "pt"} (a plain string, not
    fastcolor's JSON metadata) and the config in config.json."""
    net = ZhangNet.tiny()
    save_file({k: v.contiguous() for k, v in model_state(net).items()}, str(tmp_path / HUB_WEIGHTS),
              metadata={"format": "pt"})
    (tmp_path / HUB_CONFIG).write_text(json.dumps(net.config))
    back = fc.load_model(tmp_path)
    assert back.config == net.config and _same_weights(net, back)


def test_config_json_must_describe_the_weights(tmp_path):
    net = ZhangNet.tiny()
    save_file({k: v.contiguous() for k, v in model_state(net).items()}, str(tmp_path / HUB_WEIGHTS),
              metadata={"format": "pt"})
    (tmp_path / HUB_CONFIG).write_text(json.dumps({**net.config, "mid_width": 32}))
    with pytest.raises(ValueError, match=r"do not fit the zhang architecture its config describes"):
        fc.load_model(tmp_path)
    (tmp_path / HUB_CONFIG).write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(ValueError, match=r'config.json is not a fastcolor model config \(expected a JSON object '
                                         r'with "arch": "zhang" or "fusion", got \{"hidden_size": 4\}\)'):
        fc.load_model(tmp_path)


def _fake_hub(monkeypatch, download):
    hub = types.ModuleType("huggingface_hub")
    hub.snapshot_download = download
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)


def test_a_hub_id_loads_through_huggingface_hub(tmp_path, monkeypatch):
    net = ZhangNet.tiny()
    folder = save_pretrained(net, tmp_path / "cache" / "snapshot")
    calls = []

    def download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(folder)

    _fake_hub(monkeypatch, download)
    monkeypatch.chdir(tmp_path)  # "someone/zhang-tiny" is no local path here
    back = fc.load_model("someone/zhang-tiny")
    assert calls == [("someone/zhang-tiny", [HUB_WEIGHTS, HUB_CONFIG])] and _same_weights(net, back)


def test_a_hub_id_offline_gets_one_clear_error(tmp_path, monkeypatch):
    class LocalEntryNotFoundError(Exception):
        pass

    def download(repo_id, allow_patterns):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                      "has been disabled.")

    _fake_hub(monkeypatch, download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no file or folder 'someone/zhang-tiny' here, and the Hugging Face Hub id "
                                         r"'someone/zhang-tiny' could not be fetched \(LocalEntryNotFoundError: "
                                         r"Cannot find.*offline, pass a local folder") as info:
        fc.load_model("someone/zhang-tiny")
    assert "\n" not in str(info.value)


def test_a_hub_id_without_huggingface_hub_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as on a machine without it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"as a Hugging Face Hub id it needs the huggingface_hub package, which is "
                                         r"not installed \(pip install 'fastcolor\[hub\]'"):
        fc.load_model("someone/zhang-tiny")


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(tmp_path, monkeypatch):
    _fake_hub(monkeypatch, lambda **_: pytest.fail("a local folder must not be fetched"))
    monkeypatch.chdir(tmp_path)
    save_pretrained(ZhangNet.tiny(), tmp_path / "someone" / "zhang-tiny")
    assert isinstance(fc.load_model("someone/zhang-tiny"), ZhangNet)


def test_the_cli_weights_flag_takes_a_hub_folder(tmp_path):
    from fastcolor.app.weights import load_weights

    net = ZhangNet.tiny()
    save_pretrained(net, tmp_path / "mine")
    assert _same_weights(net, load_weights(str(tmp_path / "mine"), None, "cpu"))
    other = tmp_path / "other"  # another writer's layout: plain metadata, the config in config.json
    other.mkdir()
    save_file({k: v.contiguous() for k, v in model_state(net).items()}, str(other / HUB_WEIGHTS),
              metadata={"format": "pt"})
    (other / HUB_CONFIG).write_text(json.dumps(net.config))
    assert _same_weights(net, load_weights(str(other), "zhang-tiny", "cpu"))
