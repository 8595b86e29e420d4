"""Correctness and speed of every backend in one run: ``python -m fastcolor.bench --device cuda --json out.json``
(or ``python -m fastcolor.app.bench``, or ``fastcolor bench``).

One run yields all its data, in a few minutes, so that a GPU that is available for a short
while is enough:

1. **Correctness** of every available backend (triton, cuda, torch on the GPU; cpp, numba, torch,
   and triton under ``TRITON_INTERPRET=1`` on the CPU) against :mod:`fastcolor.reference` on fresh
   random inputs: odd shapes, float32/float16/bfloat16 logits, k in {1, 5, 10}, class weights,
   every reduction, nongray, grad_output != 1, precomputed targets, channels-last logits, the
   backend contract with a pixel scale; relative errors ``||out - ref|| / ||ref||`` and NaN
   checks, with the CUDA caching allocator's free memory poisoned with NaN before each call so
   that an element a kernel forgets to write shows up.
2. **Timings** (median of ``triton.testing.do_bench``, L2 flushed between runs; CPU: wall clock):
   fused loss forward, forward + backward, annealed-mean decode, soft-encode, per backend, and
   ``torch.log_softmax`` / ``torch.softmax`` as yardsticks, at Zhang et al.'s training shape
   (40, 313, 64, 64), the seed's (100, 313, 32, 32) and full resolution (4, 313, 512, 512) /
   (1, 313, 1024, 1024), in float32 and bfloat16.
3. **Bandwidth**: the bytes each op must move (logits read once, gradient written once, plus the
   small per-pixel inputs and outputs) per second, against the card's peak, measured in the same
   run by a large device-to-device copy.
4. **Peak memory** of loss forward + backward (``max_memory_allocated`` above the inputs) against
   the size of the gradient.
5. For the triton backend: a small launch-config sweep, fused vs separate encoding, and offsets
   beyond 2**31 elements.

On CUDA each backend runs in its own child process (``--no-isolate`` to run in-process), so that
a crash or a corrupted CUDA context in one backend costs only that backend's numbers; any error
is printed and recorded, and the run goes on. A time budget (``--budget-s``) drops the
lower-priority measurements when compilation is slow. The last thing printed is a markdown
table; ``--json [PATH]`` writes everything (to stdout when no path is given, before the table).

``--quick`` uses tiny shapes (for tests, and for ``--device cpu`` through the interpreter);
``--device cpu`` alone times (4, 313, 64, 64); ``--shapes zhang,seed`` picks shapes;
``--providers triton,torch`` picks backends.

The parts: :mod:`~fastcolor.app.bench.correctness` (1.), :mod:`~fastcolor.app.bench.timing`
(2.-5.), :mod:`~fastcolor.app.bench.report` (the table and the JSON), and
:mod:`~fastcolor.app.bench.driver` (the command line, child processes, the budget), with the
shapes and inputs they share in :mod:`~fastcolor.app.bench.common`.
"""
from fastcolor.app.bench.driver import main

__all__ = ["main"]
