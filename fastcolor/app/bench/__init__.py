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
6. **Each op per mode** (:mod:`~fastcolor.app.bench.modes`; on CUDA by default, ``--modes
   kernel,eager`` on the CPU): the kernel alone, the eager op, CUDA-graph replay and
   ``torch.compile``, per op, dtype and shape ((40, 313, 64, 64) and (64, 313, 128, 128)): the
   fewest bytes, median/p10/p90 microseconds, GB/s, % of a same-size copy and read and of the
   2 GiB copy, launches, host microseconds, syncs and peak memory per call, and the error against
   :mod:`fastcolor.reference`.
7. **The training step** (:mod:`~fastcolor.app.bench.train_step`; on CUDA by default,
   ``--train-step`` alone anywhere): a whole Adam step of ``ZhangNet`` (256 px) and
   ``ZhangNet.small`` (128 px) with the fused loss, the plain PyTorch loss, the authors' CPU k-NN
   target and no loss (the floor), round-robin, as ms per step, images per second and the share
   above the floor.

On CUDA the run starts with the correctness of triton (its default kernels and the opt-in
``FASTCOLOR_TRITON_LOSS=persistent`` and ``FASTCOLOR_TRITON_DECODE=stream``, each then measured
beside the defaults) and cuda, and ends with the ``torch.compile`` rows; each part runs in its own
child process (``--no-isolate`` to run in-process), so that a crash or a corrupted CUDA context
costs only that part's remaining numbers; any error is printed and recorded, and the run goes on.
A time budget (``--budget-s``, 300 s on CUDA) is split among the parts
(:data:`~fastcolor.app.bench.driver.PART_SHARE`) and drops the lower-priority measurements when
compilation is slow. ``--json PATH`` is rewritten after every part; the last thing printed is a
markdown table (``--json`` alone: everything to stdout, before the table). The command for a lent
GPU (build ``fastcolor._C`` first) is in bench/RESULTS.md.

``--quick`` uses tiny shapes (for tests, and for ``--device cpu`` through the interpreter);
``--device cpu`` alone times (4, 313, 64, 64); ``--shapes zhang,seed`` picks shapes;
``--providers triton,torch`` picks backends; ``--parts check,base,modes,train,providers,compile``
picks parts (``--device cuda`` runs all six, in that order, within ``--budget-s``).

The parts: :mod:`~fastcolor.app.bench.correctness` (1.), :mod:`~fastcolor.app.bench.timing`
(2.-5.), :mod:`~fastcolor.app.bench.modes` (6.), :mod:`~fastcolor.app.bench.train_step` (7.),
:mod:`~fastcolor.app.bench.report` (the tables and the JSON), and
:mod:`~fastcolor.app.bench.driver` (the command line, child processes, the budget), with the
shapes and inputs they share in :mod:`~fastcolor.app.bench.common`.
"""
from fastcolor.app.bench.driver import main

__all__ = ["main"]
