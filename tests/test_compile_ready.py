"""A training step with the fused loss compiles whole and captures into a CUDA graph (issue 12, point 3).

tests/test_ops_api.py already compiles a small conv stack + loss + decoder (fullgraph, aot_eager)
and compares it with eager; this file adds what that one does not look at:

* the network of the trainer (``ZhangNet``) in train mode (BatchNorm), with rarity weights and
  nongray, as ``train.py`` calls the loss;
* what the compiled step holds: the custom ops in the forward *and* backward graphs (not
  decomposed into plain torch), ``fastcolor::ce_forward`` once in each (so the logits are read
  twice, at most), and, saved from forward for backward, no 313-channel tensor beyond the one
  logits-sized input of that backward (no extra buffer of logits size, the gradient included);
* a precomputed ``SoftLabels`` target made inside the compiled function (``fastcolor::soft_encode``
  in the graph), the decoder differentiated (``fastcolor::annealed_mean``) and a ``grad_output``
  other than 1;
* ``ZhangNet.small`` under inductor (slow: about a minute of compiling on a CPU);
* on a GPU (``gpu``), the step captured into a CUDA graph and replayed, against eager, and the
  eager step under ``torch.cuda.set_sync_debug_mode("error")``.

``fullgraph=True`` makes any graph break an error, so these fail on one.
"""
from __future__ import annotations

import copy

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import fastcolor as fc
from fastcolor.gamut import Q
from fastcolor.models import ZhangNet


class _Capture:
    """An aot_autograd backend that runs the graphs as they are and keeps them for inspection."""

    def __init__(self):
        self.graphs: dict[str, torch.fx.GraphModule] = {}

        def keep(kind):
            def compiler(gm, example_inputs):
                self.graphs[kind] = gm
                return make_boxed_func(gm.forward)
            return compiler

        self.backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))

    def ops(self, kind: str) -> list[str]:
        return [str(n.target) for n in self.graphs[kind].graph.nodes
                if n.op == "call_function" and str(n.target).startswith("fastcolor.")]

    def saved_class_tensors(self) -> list[tuple[int, ...]]:
        """Shapes of the 313-channel tensors the forward graph hands to the backward."""
        out = next(n for n in self.graphs["forward"].graph.nodes if n.op == "output")
        shapes = []
        for a in out.args[0]:
            v = getattr(a, "meta", {}).get("val")
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == Q:
                shapes.append(tuple(v.shape))
        return shapes


def _inputs(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.rand(n, 1, size, size, generator=g) * 100
    ab = torch.rand(n, 2, size // 4, size // 4, generator=g) * 200 - 100
    ab[0] /= 40  # a grey image, for nongray
    weights = torch.rand(Q, generator=g) + 0.5
    return L, ab, weights


def _compare_step(net, compile_backend, L, ab, weights):
    """Loss and parameter gradients of a compiled and an eager training step of ``net``."""
    eager_net = copy.deepcopy(net)

    def step(model, L, ab):
        return fc.rebalanced_cross_entropy(model(L), ab, weights, nongray=True)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    loss_c = compiled(net, L, ab)
    loss_c.backward()
    loss_e = step(eager_net, L, ab)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    _same_grads(net, eager_net)


def _same_grads(net, eager_net):
    for (name, pc), pe in zip(net.named_parameters(), eager_net.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_training_step_compiles_whole_with_the_custom_ops_in_both_graphs():
    torch.manual_seed(0)
    L, ab, weights = _inputs()
    cap = _Capture()
    _compare_step(ZhangNet.tiny(), cap.backend, L, ab, weights)
    assert cap.ops("forward") == ["fastcolor.ce_forward.default"]
    assert cap.ops("backward") == ["fastcolor.ce_forward.default"]
    # The one logits-sized tensor kept for backward is the logits its kernel reads again.
    assert cap.saved_class_tensors() == [(2, Q, 64)], cap.saved_class_tensors()


def test_precomputed_labels_and_a_scaled_backward_compile_whole():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, Q, 3, 5, generator=g)
    ab = torch.rand(2, 2, 3, 5, generator=g) * 200 - 100

    def step(x, ab):
        loss = fc.rebalanced_cross_entropy(x, fc.soft_encode(ab, k=3), reduction="sum")
        return loss + 0.01 * fc.annealed_mean(x, T=0.38).square().mean()  # decoding differentiated too

    cap = _Capture()
    torch._dynamo.reset()
    x_c = logits.clone().requires_grad_(True)
    loss_c = torch.compile(step, fullgraph=True, backend=cap.backend)(x_c, ab)
    loss_c.backward(torch.tensor(2.5))
    x_e = logits.clone().requires_grad_(True)
    loss_e = step(x_e, ab)
    loss_e.backward(torch.tensor(2.5))
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(x_c.grad, x_e.grad, rtol=1e-5, atol=1e-7)
    assert cap.ops("forward") == ["fastcolor.soft_encode.default", "fastcolor.ce_forward.default",
                                  "fastcolor.annealed_mean.default"]
    assert cap.ops("backward") == ["fastcolor.ce_forward.default"]


@pytest.mark.slow
def test_zhangnet_small_training_step_under_inductor():
    torch.manual_seed(0)
    L, ab, weights = _inputs()
    _compare_step(ZhangNet.small(), "inductor", L, ab, weights)


# ----------------------------------------------------------------------------- GPU


def _cuda_step(net, L, ab, weights):
    loss = fc.rebalanced_cross_entropy(net(L), ab, weights, nongray=True)
    loss.backward()
    return loss


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")
def test_training_step_captures_into_a_cuda_graph_and_replays_like_eager():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    net = ZhangNet.small().to(dev)
    eager_net = copy.deepcopy(net)
    L, ab, weights = (t.to(dev) for t in _inputs(n=4, size=64))
    L2, ab2, _ = (t.to(dev) for t in _inputs(n=4, size=64, seed=1))

    _cuda_step(eager_net, L, ab, weights)  # the first call uploads the tables and compiles the kernels
    eager_net.zero_grad(set_to_none=True)
    torch.cuda.set_sync_debug_mode("error")  # from then on the eager step must not sync
    try:
        _cuda_step(eager_net, L, ab, weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    static_L, static_ab = L.clone(), ab.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph wants
        for _ in range(3):
            net.zero_grad(set_to_none=True)
            _cuda_step(net, static_L, static_ab, weights)
    torch.cuda.current_stream().wait_stream(side)
    net.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _cuda_step(net, static_L, static_ab, weights)

    static_L.copy_(L2)
    static_ab.copy_(ab2)
    graph.replay()
    torch.cuda.synchronize()
    eager_net.zero_grad(set_to_none=True)
    want = _cuda_step(eager_net, L2, ab2, weights)
    torch.testing.assert_close(static_loss, want, rtol=1e-5, atol=1e-6)
    _same_grads(net, eager_net)
