"""The authors' Caffe ECCV16 model, loaded into :class:`~fastcolor.models.ZhangNet`.

Zhang, Isola & Efros released their ECCV16 network first for Caffe, as
``colorization_release_v2.caffemodel`` (class rebalancing) and
``colorization_release_v2_norebal.caffemodel`` (none), with the deploy network
``models/colorization_deploy_v2.prototxt`` of richzhang/colorization: the model OpenCV's dnn
colorization sample and most tutorials run. This module reads such a file with the ``protobuf``
package alone: the few messages of Caffe's ``caffe.proto`` that hold the weights are declared at
run time from their field numbers (:func:`caffe_messages`); no Caffe and no schema file.

The deploy network, as its prototxt lists it (read against ``colorization_deploy_v2.prototxt``):

=================== ============================================ ==========================
Caffe layer          what it is                                   ZhangNet
=================== ============================================ ==========================
data_l               Input 1 x 1 x 224 x 224: L - 50               ``(L - 50) / 100`` inside
bw_conv1_1, conv1_2  conv 1->64, 64->64 stride 2; BN conv1_2norm   ``encoder.0.{0,2,4}``
conv2_1 .. conv7_3   conv blocks 2..7 as in :mod:`.zhang`; BN       ``encoder.{1..6}.*``
                     ``conv{i}_{2,3}norm`` after each
conv8_1              Deconvolution 512->256, k 4, s 2, p 1         ``decoder.0``
conv8_2, conv8_3     conv 256->256                                 ``decoder.{2,4}``
conv8_313            conv 1x1 256->313                             ``classifier``
conv8_313_rh         Scale, no bias, filler 2.606                  decode_temperature 1/2.606
class8_313_rh        Softmax                                       (annealed mean)
class8_ab            conv 1x1 313->2: the bin centres (ab units)   the class order
=================== ============================================ ==========================

The conversion, each step a fact of that prototxt or of Caffe's layers:

* **Input.** Caffe's input is ``L - 50`` (the authors' demo and OpenCV's sample subtract 50;
  the deploy net has no scaling layer), ZhangNet's first conv sees ``(L - 50) / 100`` (as the
  authors' PyTorch port): ``bw_conv1_1``'s weights are multiplied by 100.
* **BatchNorm.** Caffe's ``BatchNorm`` stores three blobs, the running mean and variance each
  multiplied by a scale factor (the third blob; divide by it, 0 meaning 0), and has no affine
  part (the deploy net has no ``Scale`` layer after it): the mean and variance are divided by
  the factor, ``weight = 1`` and ``bias = 0``; eps is Caffe's default 1e-5, as PyTorch's.
* **Temperature.** ``conv8_313_rh`` multiplies the logits by 2.606 before the softmax, so the
  Caffe pipeline is the annealed mean at T = 1 / 2.606 = 0.384 (about the paper's 0.38). The
  logits stay those of ``conv8_313`` and the model's ``decode_temperature`` is 1 / scale; its
  blob, when the file has one, gives the scale (a per-class scale that is not uniform is folded
  into the classifier instead, with T = 1). Files without it (OpenCV's sample sets it by hand)
  get 2.606, the prototxt's filler value.
* **Class order.** ``class8_ab`` holds the 313 bin centres in ab units (OpenCV's sample and the
  authors' demo set it from ``pts_in_hull.npy``); if the file has them, the classes are
  reordered into :data:`fastcolor.AB_BINS` order where they differ
  (:func:`fastcolor.models.released.reorder_classes`); an absent or all-zero ``class8_ab`` means
  the order of ``pts_in_hull.npy``, which is fastcolor's.

Stride, padding and dilation are not read from the file: they are those of the deploy network,
and a file whose blobs have other shapes is refused with a one-line error naming what it holds.
The widths (64 and 512 in the released files) are read from ``conv1_2`` and ``conv4_1``, so a
narrower net with the same layers loads the same way (the tests write one, to run OpenCV fast).
The deploy input is 224 x 224 (``input_size`` 224 in the config; any multiple of 8 runs).
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from fastcolor.io import check_weight_values, open_weights_file
from fastcolor.models.released import AB_SCALE, caller_stacklevel, reorder_classes
from fastcolor.models.zhang import Q, ZhangNet

__all__ = ["CAFFE_ECCV16", "CAFFE_SCALE", "caffe_messages", "caffe_config", "caffe_widths", "read_caffe_layers",
           "caffe_layout_problem", "convert_caffe_layers", "looks_like_caffemodel", "load_caffe"]

#: File names of the authors' Caffe ECCV16 weights (with and without class rebalancing).
CAFFE_ECCV16 = ("colorization_release_v2.caffemodel", "colorization_release_v2_norebal.caffemodel")
#: ``conv8_313_rh``'s factor in the deploy prototxt (its Scale layer's constant filler).
CAFFE_SCALE = 2.606
#: Caffe's input is ``L - 50``; ZhangNet's first conv sees ``(L - 50) / INPUT_SCALE``.
INPUT_SCALE = 100.0
#: Caffe's BatchNorm eps default (``BatchNormParameter.eps``), which nn.BatchNorm2d shares.
BN_EPS = 1e-5
#: A file larger than this is not the ECCV16 model (its caffemodel is about 129 MB).
MAX_CAFFEMODEL_BYTES = 1 << 30
#: What a file in this format holds, for error messages.
EXPECTED = (f"the authors' Caffe ECCV16 model ({CAFFE_ECCV16[0]} or its _norebal twin: the layers of "
            f"colorization_deploy_v2.prototxt)")



@functools.cache
def caffe_messages() -> dict[str, type]:
    """The message classes of the part of Caffe's ``caffe.proto`` (proto2, package ``caffe``) that
    holds a net's weights, declared at run time with Caffe's field numbers: ``NetParameter``
    (``name`` 1, the legacy ``layers`` 2, ``layer`` 100), ``LayerParameter`` (``name`` 1, ``type``
    2, ``bottom`` 3, ``top`` 4, ``blobs`` 7, ``batch_norm_param`` 139), ``V1LayerParameter``
    (``name`` 4, ``blobs`` 6), ``BlobProto`` (``num``/``channels``/``height``/``width`` 1-4,
    packed ``data`` 5, ``shape`` 7, packed ``double_data`` 8), ``BlobShape`` (packed ``dim`` 1),
    ``BatchNormParameter`` (``eps`` 3). Every other field of a file is kept as an unknown field
    and ignored. Returns name -> class; ``ImportError`` saying what to install without protobuf."""
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    except ImportError as exc:
        raise ImportError("reading a .caffemodel needs the protobuf package: pip install 'fastcolor[caffe]' "
                          "(or pip install protobuf)") from exc

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="fastcolor/caffe_weights.proto", package="caffe", syntax="proto2")

    def message(name, *fields):
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, repeated, *ref in fields:
            f = m.field.add(name=fname, number=number, type=ftype,
                            label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if ref:
                f.type_name = f".caffe.{ref[0]}"
            if repeated and ftype not in (F.TYPE_STRING, F.TYPE_MESSAGE):
                f.options.packed = True  # as caffe.proto declares its numeric arrays

    message("BlobShape", ("dim", 1, F.TYPE_INT64, True))
    message("BlobProto", ("num", 1, F.TYPE_INT32, False), ("channels", 2, F.TYPE_INT32, False),
            ("height", 3, F.TYPE_INT32, False), ("width", 4, F.TYPE_INT32, False), ("data", 5, F.TYPE_FLOAT, True),
            ("shape", 7, F.TYPE_MESSAGE, False, "BlobShape"), ("double_data", 8, F.TYPE_DOUBLE, True))
    message("BatchNormParameter", ("eps", 3, F.TYPE_FLOAT, False))
    message("LayerParameter", ("name", 1, F.TYPE_STRING, False), ("type", 2, F.TYPE_STRING, False),
            ("bottom", 3, F.TYPE_STRING, True), ("top", 4, F.TYPE_STRING, True),
            ("blobs", 7, F.TYPE_MESSAGE, True, "BlobProto"),
            ("batch_norm_param", 139, F.TYPE_MESSAGE, False, "BatchNormParameter"))
    message("V1LayerParameter", ("name", 4, F.TYPE_STRING, False), ("blobs", 6, F.TYPE_MESSAGE, True, "BlobProto"))
    message("NetParameter", ("name", 1, F.TYPE_STRING, False),
            ("layers", 2, F.TYPE_MESSAGE, True, "V1LayerParameter"),
            ("layer", 100, F.TYPE_MESSAGE, True, "LayerParameter"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    # GetMessageClass since protobuf 4.21; MessageFactory.GetPrototype before it (removed in 5.x)
    get = getattr(message_factory, "GetMessageClass", None) or message_factory.MessageFactory(pool).GetPrototype
    return {m.name: get(pool.FindMessageTypeByName(f"caffe.{m.name}")) for m in fdp.message_type}


def caffe_config(base: int = 64, mid_width: int = 512) -> dict:
    """The :class:`ZhangNet` config a Caffe ECCV16 file loads into: the paper's network (widths 64
    and 512; a file of the same layers at other widths gives those) at the deploy net's 224 x 224,
    decoded at T = 1 / 2.606 (replaced by 1 / the file's own scale)."""
    return {"arch": "zhang", "base": base, "mid_width": mid_width, "mid_dilations": [1, 2, 2, 1], "input_size": 224,
            "num_bins": Q, "decode_temperature": 1.0 / CAFFE_SCALE}


def _layer_table() -> dict[str, tuple[str, str]]:
    """Caffe layer name -> (ZhangNet module prefix, "conv" | "bn") for every layer with weights."""
    table = {"bw_conv1_1": ("encoder.0.0", "conv"), "conv1_2": ("encoder.0.2", "conv"),
             "conv1_2norm": ("encoder.0.4", "bn"), "conv2_1": ("encoder.1.0", "conv"),
             "conv2_2": ("encoder.1.2", "conv"), "conv2_2norm": ("encoder.1.4", "bn")}
    for block in range(3, 8):  # three convs and a BatchNorm each
        for j in range(3):
            table[f"conv{block}_{j + 1}"] = (f"encoder.{block - 1}.{2 * j}", "conv")
        table[f"conv{block}_3norm"] = (f"encoder.{block - 1}.6", "bn")
    table.update({"conv8_1": ("decoder.0", "conv"), "conv8_2": ("decoder.2", "conv"),
                  "conv8_3": ("decoder.4", "conv"), "conv8_313": ("classifier", "conv")})
    return table


@functools.cache
def _expected_blobs(base: int = 64, mid_width: int = 512) -> dict[str, list[tuple[int, ...]]]:
    """Caffe layer name -> the shapes of its blobs in the ECCV16 deploy network at these widths."""
    config = caffe_config(base, mid_width)
    config.pop("arch")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ZhangNet(**config).state_dict().items()}
    out = {}
    for name, (prefix, kind) in _layer_table().items():
        c = shapes[f"{prefix}.weight"] if kind == "conv" else shapes[f"{prefix}.running_mean"]
        out[name] = [c, shapes[f"{prefix}.bias"]] if kind == "conv" else [c, c, (1,)]
    return out


#: Layers of the deploy net with optional blobs (set by hand in OpenCV's sample and the authors' demo).
_OPTIONAL = {"conv8_313_rh": [(Q,), (1,), (1, Q)], "class8_ab": [(2, Q, 1, 1), (2,)]}


def _blob_array(blob, where: str) -> np.ndarray:
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:  # the legacy 4-d fields (a bias as (1, 1, 1, C)): matched to the layout by _fits
        shape = tuple(int(d) for d in (blob.num, blob.channels, blob.height, blob.width))
    data = np.asarray(blob.data, dtype=np.float32) if len(blob.data) else np.asarray(blob.double_data, np.float64)
    if any(d < 0 for d in shape) or data.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{where}: a blob of shape {shape} holds {data.size} values")
    return data.astype(np.float32).reshape(shape)


def read_caffe_layers(path: str | os.PathLike) -> tuple[str, dict[str, dict]]:
    """``path`` (a ``.caffemodel``: a binary ``NetParameter``) -> (the net's name, layer name ->
    {"type": str, "blobs": [float32 arrays], "eps": float | None}), layers without blobs included.

    ``ValueError`` (one line, naming the file) for a file that does not parse as a Caffe net, an
    old V1-format net, or a blob whose data does not fill its shape."""
    path = Path(path)
    with open_weights_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_CAFFEMODEL_BYTES:
            raise ValueError(f"path: {path} is {size / 2**20:.0f} MiB, more than any Caffe ECCV16 model "
                             f"({MAX_CAFFEMODEL_BYTES >> 20} MiB at most; the real one is about 129 MB)")
        raw = f.read()
    from google.protobuf.message import DecodeError

    net = caffe_messages()["NetParameter"]()
    try:
        net.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"path: {path} is not a Caffe model (a binary NetParameter): the protobuf parser says "
                         f"{' '.join(str(exc).split())[:200] or 'it is malformed'}") from None
    del raw  # the file's bytes (about 129 MB for the released model): the parsed message holds the values now
    if len(net.layers) and not len(net.layer):
        raise ValueError(f"path: {path} is a Caffe net in the old V1 format ({len(net.layers)} 'layers'), "
                         f"not {EXPECTED}, which uses BatchNorm layers (new format only)")
    layers = {}
    for layer in net.layer:
        where = f"path: {path}, layer {layer.name!r}"
        eps = float(layer.batch_norm_param.eps) if layer.HasField("batch_norm_param") and \
            layer.batch_norm_param.HasField("eps") else None
        layers[layer.name] = {"type": layer.type, "blobs": [_blob_array(b, where) for b in layer.blobs], "eps": eps}
    return net.name, layers


def _summary(name: str, layers: dict[str, dict]) -> str:
    """What a net holds, in a few words: its name, layer count and the first layers with weights."""
    shown = [f"{k} {[tuple(b.shape) for b in v['blobs']]}" for k, v in layers.items() if v["blobs"]][:3]
    return f"net {name!r} with {len(layers)} layers ({', '.join(shown) or 'none with weights'})"


def _fits(blob: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether ``blob`` has ``shape``, or is its legacy 4-d form (leading 1s: Caffe's num/channels/height/width)."""
    return blob.shape == shape or (blob.ndim == 4 and len(shape) < 4 and blob.shape == (1,) * (4 - len(shape)) + shape)


def _blob_shapes(blobs: list[np.ndarray], want: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The blobs' shapes, a legacy 4-d one given as the expected shape it fits."""
    return [w if w is not None and _fits(b, w) else tuple(b.shape)
            for b, w in zip(blobs, list(want) + [None] * len(blobs), strict=False)]


def caffe_widths(layers: dict[str, dict]) -> tuple[int, int]:
    """(base, mid_width) of an ECCV16-layered net: the output channels of ``conv1_2`` and ``conv4_1``
    (64 and 512 in the released model); the defaults where the file lacks those layers."""
    def out_channels(name, default):
        blobs = layers.get(name, {}).get("blobs") or []
        return int(blobs[0].shape[0]) if blobs and blobs[0].ndim == 4 and blobs[0].shape[0] > 0 else default

    return out_channels("conv1_2", 64), out_channels("conv4_1", 512)


def caffe_layout_problem(name: str, layers: dict[str, dict]) -> str | None:
    """None if ``layers`` (from :func:`read_caffe_layers`) are the ECCV16 deploy net's (at the widths
    of :func:`caffe_widths`), else what differs and what the file holds (one line)."""
    want = _expected_blobs(*caffe_widths(layers))
    missing = [k for k in want if k not in layers and not (k == "bw_conv1_1" and "conv1_1" in layers)]
    wrong = []
    for k, shapes in want.items():
        got = layers.get(k if k in layers else "conv1_1" if k == "bw_conv1_1" else k)
        if got is not None and _blob_shapes(got["blobs"], shapes) != shapes:
            wrong.append(f"{k}: file {[tuple(b.shape) for b in got['blobs']]}, expected {shapes}")
    for k, shapes in _OPTIONAL.items():
        got = layers.get(k)
        if got is not None and any(not any(_fits(b, s) for s in shapes) for b in got["blobs"]):
            wrong.append(f"{k}: file {[tuple(b.shape) for b in got['blobs']]}")
    for k, layer in layers.items():
        if layer["eps"] is not None and k in want and abs(layer["eps"] - BN_EPS) > 1e-9:
            wrong.append(f"{k}: BatchNorm eps {layer['eps']:g}, expected {BN_EPS:g}")
    if not (missing or wrong):
        return None
    parts = [f"{len(missing)} layers missing (e.g. {missing[:3]})" if missing else "",
             f"blobs differ: {wrong[:2]}" if wrong else ""]
    return f"found {_summary(name, layers)}: " + "; ".join(p for p in parts if p)


def convert_caffe_layers(layers: dict[str, dict], source: str = "the file") -> tuple[dict[str, torch.Tensor], float]:
    """ECCV16 Caffe layers (checked by :func:`caffe_layout_problem`) -> (a :class:`ZhangNet` state
    dict in fastcolor's class order, the decode temperature). See the module docstring for each step."""
    state: dict[str, torch.Tensor] = {}
    want = _expected_blobs(*caffe_widths(layers))
    for name, (prefix, kind) in _layer_table().items():
        blobs = [torch.from_numpy(b.reshape(w))  # read_caffe_layers' arrays are its own: shared, not copied
                 for b, w in zip(layers[name if name in layers else "conv1_1"]["blobs"], want[name], strict=True)]
        if kind == "conv":
            weight, bias = blobs
            state[f"{prefix}.weight"] = weight * INPUT_SCALE if name == "bw_conv1_1" else weight
            state[f"{prefix}.bias"] = bias
        else:
            mean, var, factor = blobs
            f = 0.0 if float(factor[0]) == 0 else 1.0 / float(factor[0])
            state[f"{prefix}.running_mean"] = mean * f
            state[f"{prefix}.running_var"] = var * f
            state[f"{prefix}.weight"] = torch.ones_like(mean)
            state[f"{prefix}.bias"] = torch.zeros_like(mean)
            state[f"{prefix}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    T = 1.0 / CAFFE_SCALE
    scale_blobs = layers.get("conv8_313_rh", {}).get("blobs") or []
    if scale_blobs:
        s = torch.from_numpy(scale_blobs[0].copy()).reshape(-1).double()  # (1,), (313,) or (1, 313)
        if bool((s == s[0]).all()) and float(s[0]) > 0:
            T = 1.0 / float(s[0])
        else:  # a per-class scale: into the classifier, decoded at T = 1
            s = s.expand(Q).float() if s.numel() == 1 else s.float()
            state["classifier.weight"] = state["classifier.weight"] * s[:, None, None, None]
            state["classifier.bias"] = state["classifier.bias"] * s
            T = 1.0
    ab_blobs = layers.get("class8_ab", {}).get("blobs") or []
    if ab_blobs and np.any(ab_blobs[0]):
        reorder_classes(state, torch.from_numpy(ab_blobs[0].reshape(2, Q, 1, 1).copy()) / AB_SCALE, source,
                        "class8_ab")
        if len(ab_blobs) > 1 and np.any(ab_blobs[1]):
            warnings.warn(f"{source}: class8_ab has a non-zero bias {ab_blobs[1].tolist()}, which fastcolor's "
                          f"annealed mean does not add: colours differ from the Caffe output by it",
                          stacklevel=caller_stacklevel())
    return state, T


def looks_like_caffemodel(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named ``*.caffemodel`` or opens as a serialised ``NetParameter`` does
    (its first field the net's name, 1, or a layer, 100); False where no regular file is there."""
    path = Path(path)
    if path.suffix.lower() == ".caffemodel":
        return True
    try:
        with open_weights_file(path) as f:
            head = f.read(2)
    except (OSError, ValueError):
        return False
    return head[:1] == b"\x0a" or head == b"\xa2\x06"


#: Config entries that a caller may change on a Caffe model (they change no tensor).
OVERRIDABLE = ("input_size", "decode_temperature")


def load_caffe(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides) -> ZhangNet:
    """A Caffe ECCV16 ``.caffemodel`` -> :class:`ZhangNet` in eval mode on ``device``.

    The logits are ``conv8_313``'s (before the 2.606 scale); the config is :func:`caffe_config`
    with the file's temperature, updated with ``overrides`` of :data:`OVERRIDABLE`. A file that is
    not the ECCV16 deploy net raises ``ValueError`` (one line) naming what it holds.

    Example::

        net = load_caffe("colorization_release_v2.caffemodel")
        rgb = fastcolor.colorize.colorize_image(net, "photo.jpg")   # at T = 1 / 2.606, as Caffe
    """
    path = Path(path)
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise ValueError(f"overrides: only {list(OVERRIDABLE)} can change on the Caffe ECCV16 network, got {bad}")
    name, layers = read_caffe_layers(path)
    problem = caffe_layout_problem(name, layers)
    if problem:
        raise ValueError(f"path: {path} is not {EXPECTED}; {problem}")
    state, T = convert_caffe_layers(layers, str(path))
    check_weight_values(state, path)  # NaN/Inf, absurd or negative-variance weights would colorize black
    config = {**caffe_config(*caffe_widths(layers)), "decode_temperature": T, **overrides}
    config.pop("arch")
    with torch.device("meta"):
        model = ZhangNet(**config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()
