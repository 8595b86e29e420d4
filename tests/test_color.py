import warnings

import numpy as np
import pytest
import skimage.color
import skimage.data
import torch

from fastcolor.color import gray_rgb, join_l_ab, l_ab_to_rgb, lab_to_rgb, rgb_to_l, rgb_to_lab, split_l_ab


def _chw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


def _hwc(t):
    return np.moveaxis(t.detach().cpu().numpy(), -3, -1)


@pytest.fixture(scope="module")
def astronaut():
    return skimage.data.astronaut()[::4, ::4] / 255.0  # (128, 128, 3) float64


def test_rgb_to_lab_matches_skimage_float64(astronaut):
    rng = np.random.default_rng(0)
    x = np.concatenate([astronaut, rng.random(astronaut.shape)], axis=0)
    got = rgb_to_lab(_chw(x))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(_hwc(got), skimage.color.rgb2lab(x), atol=1e-9)


def test_rgb_to_lab_float32_within_1e3(astronaut):
    got = rgb_to_lab(_chw(astronaut).float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(_hwc(got), skimage.color.rgb2lab(astronaut), atol=1e-3)


def test_lab_to_rgb_matches_skimage_and_clamps():
    rng = np.random.default_rng(1)
    lab = np.dstack([rng.uniform(0, 100, (50, 60)), rng.uniform(-128, 127, (50, 60, 2))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about negative Z
        ref = skimage.color.lab2rgb(lab)
    got = lab_to_rgb(_chw(lab))
    np.testing.assert_allclose(_hwc(got), ref, atol=1e-9)
    np.testing.assert_allclose(_hwc(lab_to_rgb(_chw(lab).float())), ref, atol=1e-4)
    assert got.min() >= 0 and got.max() <= 1
    unclipped = lab_to_rgb(_chw(lab), clip=False)
    assert unclipped.min() < 0 or unclipped.max() > 1  # random ab is mostly out of gamut


def test_batched_equals_single_and_shapes(astronaut):
    x = _chw(astronaut).float()
    batch = torch.stack([x, x.flip(-1), x.flip(-2)])
    lab = rgb_to_lab(batch)
    assert lab.shape == (3, 3, 128, 128)
    for i in range(3):
        torch.testing.assert_close(lab[i], rgb_to_lab(batch[i]))
    torch.testing.assert_close(rgb_to_l(batch), lab[:, :1], atol=1e-4, rtol=0)
    L, ab = split_l_ab(lab)
    assert L.shape == (3, 1, 128, 128) and ab.shape == (3, 2, 128, 128)
    torch.testing.assert_close(join_l_ab(L, ab), lab)
    assert 0 <= L.min() and L.max() <= 100


def test_exact_8bit_round_trip():
    rng = np.random.default_rng(2)
    colours = rng.integers(0, 256, size=(3, 1, 300_000), dtype=np.uint8)
    # the corners of the cube as well
    corners = np.array(np.meshgrid([0, 255], [0, 255], [0, 255])).reshape(3, 1, 8).astype(np.uint8)
    colours = torch.from_numpy(np.concatenate([colours, corners], axis=2))
    for dtype in (torch.float32, torch.float64):
        lab = rgb_to_lab(colours.to(dtype) / 255)
        back = (lab_to_rgb(lab) * 255).round().to(torch.uint8)
        assert torch.equal(back, colours), dtype
    # uint8 input is scaled by 1/255
    torch.testing.assert_close(rgb_to_lab(colours), rgb_to_lab(colours.float() / 255))


def test_gray_is_neutral_and_l_ab_to_rgb():
    L = torch.linspace(0, 100, 11).reshape(1, 1, 1, 11)
    g = gray_rgb(L)
    assert g.shape == (1, 3, 1, 11)
    torch.testing.assert_close(g[:, 0], g[:, 1])
    torch.testing.assert_close(g[:, 1], g[:, 2])
    torch.testing.assert_close(rgb_to_l(g), L, atol=1e-3, rtol=0)
    torch.testing.assert_close(l_ab_to_rgb(L, torch.zeros(1, 2, 1, 11)), g, atol=1e-4, rtol=0)


def test_gradients_are_finite():
    x = torch.tensor([0.0, 1e-4, 0.04045, 0.5, 1.0]).reshape(1, 1, 5).expand(3, 1, 5).clone().requires_grad_()
    rgb_to_lab(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    lab = torch.tensor([[0.0, 50.0, 100.0], [0.0, 80.0, -120.0], [0.0, -90.0, 120.0]]).reshape(3, 1, 3)
    lab.requires_grad_()
    lab_to_rgb(lab).sum().backward()
    assert torch.isfinite(lab.grad).all()


def test_bad_input_names_argument():
    with pytest.raises(TypeError, match="rgb"):
        rgb_to_lab(np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match=r"rgb.*\(4, 4, 3\)"):
        rgb_to_lab(torch.zeros(4, 4, 3))
    with pytest.raises(TypeError, match="lab"):
        lab_to_rgb(torch.zeros(3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="ab"):
        join_l_ab(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 5))
