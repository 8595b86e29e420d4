"""The authors' Caffe ECCV16 model (issue 22.5): fastcolor's reader against OpenCV's Caffe importer.

Each test writes a ``.caffemodel`` with random weights (the messages of
:func:`fastcolor.models.caffe.caffe_messages`) and a deploy prototxt written here from the layer
list of ``colorization_deploy_v2.prototxt``, at narrow widths so that both run in well under a
second. OpenCV (``cv2.dnn.readNetFromCaffe``, its own copy of ``caffe.proto``, its own layers)
runs the Caffe pipeline, L - 50 in and ab out of ``class8_ab``; fastcolor loads the same file
into a ZhangNet and decodes its logits with the annealed mean at the model's temperature.
"""
import warnings

import numpy as np
import pytest
import torch

import fastcolor as fc
from fastcolor.models import ZhangNet
from fastcolor.models.caffe import (
    CAFFE_SCALE,
    caffe_layout_problem,
    caffe_messages,
    load_caffe,
    looks_like_caffemodel,
    read_caffe_layers,
)

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (the test extra) runs the Caffe reference")
if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):  # OpenCV 5 dropped the Caffe importer
    pytest.skip("this OpenCV has no Caffe importer (opencv-python-headless<5 has)", allow_module_level=True)

BASE, MID, SIZE = 4, 8, 64  # widths of the test net; input SIZE x SIZE


def _conv_layers(base, mid):
    """(name, kind, c_in, c_out, kernel, stride, pad, dilation) in deploy order; kind conv/deconv/bn."""
    c1, c2, c3 = base, 2 * base, 4 * base
    out = [("bw_conv1_1", "conv", 1, c1, 3, 1, 1, 1), ("conv1_2", "conv", c1, c1, 3, 2, 1, 1),
           ("conv1_2norm", "bn", c1), ("conv2_1", "conv", c1, c2, 3, 1, 1, 1), ("conv2_2", "conv", c2, c2, 3, 2, 1, 1),
           ("conv2_2norm", "bn", c2), ("conv3_1", "conv", c2, c3, 3, 1, 1, 1), ("conv3_2", "conv", c3, c3, 3, 1, 1, 1),
           ("conv3_3", "conv", c3, c3, 3, 2, 1, 1), ("conv3_3norm", "bn", c3)]
    c = c3
    for block, dil in zip(range(4, 8), (1, 2, 2, 1), strict=True):
        for j in range(3):
            out.append((f"conv{block}_{j + 1}", "conv", c if j == 0 else mid, mid, 3, 1, dil, dil))
        out.append((f"conv{block}_3norm", "bn", mid))
        c = mid
    out += [("conv8_1", "deconv", mid, c3, 4, 2, 1, 1), ("conv8_2", "conv", c3, c3, 3, 1, 1, 1),
            ("conv8_3", "conv", c3, c3, 3, 1, 1, 1), ("conv8_313", "conv", c3, 313, 1, 1, 0, 1)]
    return out


def deploy_prototxt(base, mid, size):
    """The deploy net as prototxt text, written from its layer list (Input, conv/deconv + ReLU,
    BatchNorm, Scale 2.606, Softmax, class8_ab)."""
    lines = ['name: "LtoAB_test"',
             f'layer {{ name: "data_l" type: "Input" top: "data_l" '
             f'input_param {{ shape {{ dim: 1 dim: 1 dim: {size} dim: {size} }} }} }}']
    bottom = "data_l"
    for name, kind, *dims in _conv_layers(base, mid):
        if kind == "bn":
            lines.append(f'layer {{ name: "{name}" type: "BatchNorm" bottom: "{bottom}" top: "{name}" '
                         f'batch_norm_param {{ }} }}')
        else:
            _c_in, c_out, k, stride, pad, dil = dims
            typ = "Deconvolution" if kind == "deconv" else "Convolution"
            lines.append(f'layer {{ name: "{name}" type: "{typ}" bottom: "{bottom}" top: "{name}" convolution_param '
                         f'{{ num_output: {c_out} kernel_size: {k} stride: {stride} pad: {pad} dilation: {dil} }} }}')
            if name != "conv8_313":
                lines.append(f'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{name}" top: "{name}" }}')
        bottom = name
    lines += ['layer { name: "conv8_313_rh" type: "Scale" bottom: "conv8_313" top: "conv8_313_rh" '
              'scale_param { bias_term: false } }',
              'layer { name: "class8_313_rh" type: "Softmax" bottom: "conv8_313_rh" top: "class8_313_rh" }',
              'layer { name: "class8_ab" type: "Convolution" bottom: "class8_313_rh" top: "class8_ab" '
              'convolution_param { num_output: 2 kernel_size: 1 } }']
    return "\n".join(lines) + "\n"


def random_layers(base, mid, seed):
    """Caffe layer name -> list of float32 blobs, random but keeping activations O(1)."""
    rng = np.random.default_rng(seed)
    layers = {}
    for name, kind, *dims in _conv_layers(base, mid):
        if kind == "bn":
            c = dims[0]
            factor = rng.uniform(0.5, 1000.0)  # Caffe's moving-average normaliser: divide by it
            layers[name] = [rng.normal(0, 0.3, c) * factor, rng.uniform(0.5, 2.0, c) * factor, np.array([factor])]
        else:
            c_in, c_out, k = dims[:3]
            shape = (c_in, c_out, k, k) if kind == "deconv" else (c_out, c_in, k, k)
            layers[name] = [rng.normal(0, np.sqrt(2.0 / (c_in * k * k)), shape), rng.normal(0, 0.1, c_out)]
    layers["bw_conv1_1"][0] = layers["bw_conv1_1"][0] / 50  # L - 50 spans +-50: keep the first layer O(1)
    return {k: [np.asarray(b, np.float32) for b in v] for k, v in layers.items()}


def write_caffemodel(path, layers, name="LtoAB_test", types=None, legacy_shape=()):
    """``layers`` (name -> blobs) as a binary NetParameter, blobs with a BlobShape (or, for the names in
    ``legacy_shape``, Caffe's legacy num/channels/height/width fields)."""
    m = caffe_messages()
    net = m["NetParameter"](name=name)
    for lname, blobs in layers.items():
        layer = net.layer.add(name=lname, type=(types or {}).get(lname, "Convolution"))
        for b in blobs:
            blob = layer.blobs.add()
            if lname in legacy_shape:
                blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - b.ndim) + b.shape
            else:
                blob.shape.dim.extend(b.shape)
            blob.data.extend(b.ravel().tolist())
    path.write_bytes(net.SerializeToString())
    return path


def opencv_ab(proto, model, L, scale=None, class8=None):
    """OpenCV's Caffe pipeline: ab (N, 2, h, w) from class8_ab, and conv8_313's logits, for L in 0..100."""
    net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    if scale is not None:  # as OpenCV's colorization sample does for files without these blobs
        net.getLayer(net.getLayerId("conv8_313_rh")).blobs = [np.full((1, 313), scale, np.float32)]
    if class8 is not None:
        net.getLayer(net.getLayerId("class8_ab")).blobs = [class8.astype(np.float32)]
    net.setInput((L - 50.0).astype(np.float32))
    ab, logits = net.forward(["class8_ab", "conv8_313"])
    return ab, logits


def fastcolor_ab(model, L):
    with torch.no_grad():
        logits = model(torch.from_numpy(L))
        return fc.annealed_mean(logits, T=model.config["decode_temperature"]).numpy(), logits.numpy()


def bins_blob(order):
    """class8_ab's weight: the bin centres (ab units) in the given class order, (2, 313, 1, 1)."""
    return np.ascontiguousarray(fc.AB_BINS[order].T.reshape(2, 313, 1, 1))


@pytest.fixture
def L():
    return np.random.default_rng(0).uniform(0, 100, (2, 1, SIZE, SIZE)).astype(np.float32)


@pytest.fixture
def proto(tmp_path):
    p = tmp_path / "deploy.prototxt"
    p.write_text(deploy_prototxt(BASE, MID, SIZE))
    return p


def _compare(model, proto, path, L, **opencv_kw):
    want_ab, want_logits = opencv_ab(proto, path, L, **opencv_kw)
    got_ab, _ = fastcolor_ab(model, L)
    assert want_ab.shape == got_ab.shape == (2, 2, SIZE // 4, SIZE // 4)
    assert np.abs(want_ab).max() > 5  # a non-trivial colour map
    np.testing.assert_allclose(got_ab, want_ab, rtol=0, atol=2e-3 * np.abs(want_ab).max())
    return want_logits


def test_a_file_with_scale_and_permuted_bins_matches_opencv(tmp_path, proto, L):
    """The file's own class8_ab in another class order (fastcolor reorders its classifier) and its
    own Scale blob (3.0: the model decodes at T = 1/3)."""
    layers = random_layers(BASE, MID, seed=1)
    order = np.random.default_rng(1).permutation(313)
    layers["conv8_313_rh"] = [np.full(313, 3.0, np.float32)]
    layers["class8_ab"] = [bins_blob(order).astype(np.float32), np.zeros(2, np.float32)]
    path = write_caffemodel(tmp_path / "net.caffemodel", layers, legacy_shape={"conv8_313"})
    model = fc.load_model(path)
    assert isinstance(model, ZhangNet) and not model.training
    assert model.config["decode_temperature"] == pytest.approx(1 / 3.0)
    assert (model.config["base"], model.config["mid_width"], model.config["input_size"]) == (BASE, MID, 224)
    want_logits = _compare(model, proto, path, L)
    with torch.no_grad():  # the logits are conv8_313's, before the scale, in fastcolor's bin order
        got_logits = model(torch.from_numpy(L)).numpy()
    np.testing.assert_allclose(got_logits[:, order], want_logits, rtol=0, atol=1e-4 * np.abs(want_logits).max())


def test_a_file_without_the_hand_set_blobs_decodes_at_one_over_2606(tmp_path, proto, L):
    """The released files' case as OpenCV's sample treats it: conv8_313_rh and class8_ab set by hand
    (2.606; pts_in_hull, fastcolor's order). fastcolor assumes the same."""
    layers = random_layers(BASE, MID, seed=2)
    path = write_caffemodel(tmp_path / "colorization_release_v2_norebal.caffemodel", layers)
    model = fc.load_model(path)
    assert model.config["decode_temperature"] == pytest.approx(1 / CAFFE_SCALE)
    _compare(model, proto, path, L, scale=CAFFE_SCALE, class8=bins_blob(np.arange(313)))


def test_a_per_class_scale_is_folded_into_the_classifier(tmp_path, proto, L):
    layers = random_layers(BASE, MID, seed=3)
    layers["conv8_313_rh"] = [np.random.default_rng(3).uniform(1.5, 3.5, 313).astype(np.float32)]
    layers["class8_ab"] = [bins_blob(np.arange(313)).astype(np.float32)]
    path = write_caffemodel(tmp_path / "net.caffemodel", layers)
    model = load_caffe(path)
    assert model.config["decode_temperature"] == 1.0
    _compare(model, proto, path, L)


def test_blobs_read_back_and_the_mapping_facts(tmp_path):
    """What the reader returns, and the three conversions: the first conv x 100 (input L - 50 vs
    (L - 50) / 100), BatchNorm's blobs divided by their scale factor, no affine part."""
    layers = random_layers(BASE, MID, seed=4)
    layers["conv2_2norm"][2] = np.array([0.0], np.float32)  # factor 0: Caffe reads the statistics as 0
    path = write_caffemodel(tmp_path / "net.caffemodel", layers, types={"conv1_2norm": "BatchNorm"})
    name, read = read_caffe_layers(path)
    assert name == "LtoAB_test" and read["conv1_2norm"]["type"] == "BatchNorm"
    for k, blobs in layers.items():
        for a, b in zip(read[k]["blobs"], blobs, strict=True):
            np.testing.assert_array_equal(a, b)
    model = load_caffe(path)
    sd = model.state_dict()
    np.testing.assert_allclose(sd["encoder.0.0.weight"].numpy(), layers["bw_conv1_1"][0] * 100, rtol=1e-6)
    mean, var, factor = layers["conv1_2norm"]
    np.testing.assert_allclose(sd["encoder.0.4.running_mean"].numpy(), mean / factor[0], rtol=1e-6)
    np.testing.assert_allclose(sd["encoder.0.4.running_var"].numpy(), var / factor[0], rtol=1e-6)
    assert (sd["encoder.1.4.running_mean"] == 0).all() and (sd["encoder.1.4.running_var"] == 0).all()
    assert (sd["encoder.0.4.weight"] == 1).all() and (sd["encoder.0.4.bias"] == 0).all()


def test_the_released_shapes_are_the_default_layout():
    """At the released widths (64, 512) the expected blobs are those of the deploy prototxt."""
    from fastcolor.models.caffe import _expected_blobs
    want = _expected_blobs()
    assert want["bw_conv1_1"] == [(64, 1, 3, 3), (64,)]
    assert want["conv4_1"] == [(512, 256, 3, 3), (512,)]
    assert want["conv8_1"] == [(512, 256, 4, 4), (256,)]  # Deconvolution: (c_in, c_out, k, k)
    assert want["conv8_313"] == [(313, 256, 1, 1), (313,)]
    assert want["conv7_3norm"] == [(512,), (512,), (1,)]
    assert sum(len(v) for v in want.values()) == 23 * 2 + 7 * 3  # 23 convolutions, 7 BatchNorms


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(b"\xff\xff\xff\xff not protobuf"), r"is not a Caffe model \(a binary NetParameter\)"),
    (lambda p: write_caffemodel(p, {"conv1": [np.zeros((96, 3, 11, 11), np.float32)], "fc8": [np.zeros(1000)]},
                                name="CaffeNet"),
     r"is not the authors' Caffe ECCV16 model .*found net 'CaffeNet' with 2 layers \(conv1 \[\(96, 3, 11, 11\)\]"),
    (lambda p: write_caffemodel(p, {**random_layers(BASE, MID, 5), "conv3_2": [np.zeros((3, 3), np.float32)]}),
     r"blobs differ: \['conv3_2: file \[\(3, 3\)\], expected"),
])
def test_other_files_get_a_one_line_error_naming_what_was_found(tmp_path, make, match):
    path = tmp_path / "other.caffemodel"
    make(path)
    with pytest.raises(ValueError, match=match) as info:
        fc.load_model(path)
    assert "\n" not in str(info.value)


def test_a_v1_net_and_a_short_blob_are_refused(tmp_path):
    m = caffe_messages()
    net = m["NetParameter"](name="old")
    net.layers.add(name="conv1")
    path = tmp_path / "old.caffemodel"
    path.write_bytes(net.SerializeToString())
    with pytest.raises(ValueError, match=r"old V1 format \(1 'layers'\)"):
        fc.load_model(path)
    net = m["NetParameter"](name="short")
    blob = net.layer.add(name="conv1_2").blobs.add()
    blob.shape.dim.extend([4, 4])
    blob.data.extend([1.0] * 15)
    path.write_bytes(net.SerializeToString())
    with pytest.raises(ValueError, match=r"layer 'conv1_2': a blob of shape \(4, 4\) holds 15 values"):
        read_caffe_layers(path)


def test_a_caffemodel_is_recognised_by_name_and_by_content(tmp_path):
    layers = random_layers(BASE, MID, seed=6)
    plain = write_caffemodel(tmp_path / "weights.bin", layers)
    assert looks_like_caffemodel(plain) and looks_like_caffemodel(tmp_path / "x.caffemodel")
    assert caffe_layout_problem(*read_caffe_layers(plain)) is None
    assert isinstance(fc.load_model(plain), ZhangNet)
    st = tmp_path / "m.safetensors"
    fc.models.serialization.save_model(st, ZhangNet.tiny())
    assert not looks_like_caffemodel(st)


def test_overrides_and_the_cli_weights_flag(tmp_path):
    from fastcolor.app.weights import load_weights

    path = write_caffemodel(tmp_path / "colorization_release_v2.caffemodel", random_layers(BASE, MID, seed=7))
    model = fc.load_model(path, input_size=64, decode_temperature=0.5)
    assert model.config["input_size"] == 64 and model.config["decode_temperature"] == 0.5
    with pytest.raises(ValueError, match=r"overrides: only \['input_size', 'decode_temperature'\]"):
        load_caffe(path, base=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = load_weights(str(path), None, "cpu")
    assert isinstance(net, ZhangNet) and net.config["decode_temperature"] == pytest.approx(1 / CAFFE_SCALE)


def test_a_class8_ab_that_is_not_the_bins_warns_and_keeps_the_order(tmp_path):
    layers = random_layers(BASE, MID, seed=8)
    layers["class8_ab"] = [np.random.default_rng(8).normal(0, 50, (2, 313, 1, 1)).astype(np.float32),
                           np.array([1.0, 0.0], np.float32)]
    path = write_caffemodel(tmp_path / "net.caffemodel", layers)
    with pytest.warns(UserWarning) as record:
        model = fc.load_model(path)
    text = " | ".join(str(w.message) for w in record)
    assert "class8_ab does not hold the 313 ab bin centres" in text and "non-zero bias [1.0, 0.0]" in text
    assert all(w.filename == __file__ for w in record)  # pointed at the caller's line
    np.testing.assert_array_equal(model.classifier.bias.detach().numpy(), layers["conv8_313"][1])


def test_without_protobuf_the_error_says_what_to_install(tmp_path, monkeypatch):
    import sys

    from fastcolor.models import caffe

    path = write_caffemodel(tmp_path / "net.caffemodel", random_layers(BASE, MID, seed=9))
    caffe.caffe_messages.cache_clear()
    monkeypatch.setitem(sys.modules, "google.protobuf", None)
    try:
        with pytest.raises(ImportError, match=r"needs the protobuf package: pip install 'fastcolor\[caffe\]'"):
            fc.load_model(path)
    finally:
        monkeypatch.undo()
        caffe.caffe_messages.cache_clear()
