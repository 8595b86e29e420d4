// pybind11 bindings of the fastcolor kernels (backends "cpp" and "cuda").
//
// No libtorch: Python passes raw data pointers (tensor.data_ptr() as int), sizes, a dtype
// code (0 float32, 1 float16, 2 bfloat16) and, for CUDA, the device index and the current
// stream (torch.cuda.current_stream().cuda_stream as int). Tensors must be contiguous
// (N, C, P); fastcolor/backends/compiled_backend.py guarantees it. A pointer of 0 means
// "not given". The CPU functions release the GIL while they run.
//
// register_kernels(m) is called from PYBIND11_MODULE in csrc/module.cpp.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "fc_api.cuh"
#include "fc_math.cuh"

#ifndef FASTCOLOR_WITH_CUDA
#define FASTCOLOR_WITH_CUDA 0
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check_sizes(int64_t N, int64_t P) {
  if (N < 0 || P < 0) throw std::invalid_argument("fastcolor._C: negative size");
}

void check_k(int k) {
  if (k < 1 || k > fc::K_MAX) throw std::invalid_argument("fastcolor._C: k must be in 1..16");
}

void check_dtype(int dtype) {
  if (dtype < fc::kF32 || dtype > fc::kBF16)
    throw std::invalid_argument("fastcolor._C: dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
}

void check_ptr(uintptr_t p, const char* what) {
  if (p == 0) throw std::invalid_argument(std::string("fastcolor._C: null pointer for ") + what);
}

float neg_inv_2s2(double sigma) {
  if (!(sigma > 0)) throw std::invalid_argument("fastcolor._C: sigma must be positive");
  return (float)(-1.0 / (2.0 * sigma * sigma));
}

fc::EncodeArgs encode_args(uintptr_t ab, uintptr_t idx, uintptr_t w, int64_t N, int64_t P, int k, double sigma) {
  check_sizes(N, P);
  check_k(k);
  fc::EncodeArgs a{ptr<const float>(ab), ptr<int32_t>(idx), ptr<float>(w), N, P, k, neg_inv_2s2(sigma)};
  if (N * P > 0) {
    check_ptr(ab, "ab");
    check_ptr(idx, "indices");
    check_ptr(w, "weights");
  }
  return a;
}

fc::CeArgs ce_args(uintptr_t logits, int dtype, uintptr_t ab, uintptr_t idx, uintptr_t w, uintptr_t cw, uintptr_t mask,
                   uintptr_t pscale, uintptr_t loss, uintptr_t grad, int64_t N, int64_t P, int k, double sigma,
                   double grad_scale) {
  check_sizes(N, P);
  check_k(k);
  check_dtype(dtype);
  if ((ab == 0) == (idx == 0)) throw std::invalid_argument("fastcolor._C: expected exactly one of ab and indices");
  if (idx != 0 && w == 0) throw std::invalid_argument("fastcolor._C: indices given without weights");
  fc::CeArgs a{ptr<const void>(logits), dtype, ptr<const float>(ab), ptr<const int32_t>(idx), ptr<const float>(w),
               ptr<const float>(cw), ptr<const float>(mask), ptr<const float>(pscale), ptr<float>(loss),
               ptr<void>(grad), N, P, k, neg_inv_2s2(sigma), (float)grad_scale};
  if (N * P > 0) {
    check_ptr(logits, "logits");
    check_ptr(loss, "loss");
  }
  return a;
}

fc::AnnealArgs anneal_args(uintptr_t x, int dtype, uintptr_t out, int64_t N, int64_t P, double T, bool is_probs) {
  check_sizes(N, P);
  check_dtype(dtype);
  if (!(T >= 1e-6)) throw std::invalid_argument("fastcolor._C: T must be >= 1e-6");
  fc::AnnealArgs a{ptr<const void>(x), dtype, ptr<float>(out), N, P, (float)(1.0 / T), is_probs};
  if (N * P > 0) {
    check_ptr(x, "x");
    check_ptr(out, "out");
  }
  return a;
}

#if FASTCOLOR_WITH_CUDA
void cuda_check(const char* err) {
  if (err) throw std::runtime_error(std::string("fastcolor._C CUDA error: ") + err);
}
#endif

py::list kernel_list() {
  py::list l;
#if FASTCOLOR_WITH_CUDA
  for (const char* const* n = fc::cuda::kernel_names(); *n; ++n) l.append(*n);
#endif
  return l;
}

}  // namespace

void register_kernels(py::module_& m) {
  m.def(
      "cpu_soft_encode",
      [](uintptr_t ab, uintptr_t idx, uintptr_t w, int64_t N, int64_t P, int k, double sigma, int nthreads) {
        const fc::EncodeArgs a = encode_args(ab, idx, w, N, P, k, sigma);
        py::gil_scoped_release nogil;
        fc::cpu::soft_encode(a, nthreads);
      },
      py::arg("ab"), py::arg("indices"), py::arg("weights"), py::arg("N"), py::arg("P"), py::arg("k"),
      py::arg("sigma"), py::arg("nthreads") = 0,
      "Soft-encode float32 ab (N, 2, P) into int32 indices and float32 weights (N, k, P).");
  m.def(
      "cpu_ce_forward",
      [](uintptr_t logits, int dtype, uintptr_t ab, uintptr_t idx, uintptr_t w, uintptr_t cw, uintptr_t mask,
         uintptr_t pscale, uintptr_t loss, uintptr_t grad, int64_t N, int64_t P, int k, double sigma,
         double grad_scale, int nthreads) {
        const fc::CeArgs a = ce_args(logits, dtype, ab, idx, w, cw, mask, pscale, loss, grad, N, P, k, sigma, grad_scale);
        py::gil_scoped_release nogil;
        fc::cpu::ce_forward(a, nthreads);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("ab"), py::arg("indices"), py::arg("weights"),
      py::arg("class_weights"), py::arg("image_mask"), py::arg("pixel_scale"), py::arg("loss"), py::arg("grad"),
      py::arg("N"), py::arg("P"), py::arg("k"), py::arg("sigma"), py::arg("grad_scale"), py::arg("nthreads") = 0,
      "Fused soft-encoding + class-rebalanced cross-entropy: per-pixel loss (N, P) and, if grad != 0, "
      "the gradient (N, 313, P) in the logits' dtype.");
  m.def(
      "cpu_annealed_mean",
      [](uintptr_t x, int dtype, uintptr_t out, int64_t N, int64_t P, double T, bool is_probs, int nthreads) {
        const fc::AnnealArgs a = anneal_args(x, dtype, out, N, P, T, is_probs);
        py::gil_scoped_release nogil;
        fc::cpu::annealed_mean(a, nthreads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("out"), py::arg("N"), py::arg("P"), py::arg("T"), py::arg("is_probs"),
      py::arg("nthreads") = 0, "Annealed mean of (N, 313, P) logits or probabilities into float32 ab (N, 2, P).");
  m.def("cpu_isa", []() { return std::string(fc::cpu::isa()); },
        "Instruction set the CPU loops run with: 'avx512', 'avx2' or 'default'.");
  m.def("cpu_set_isa", [](const std::string& name) { return fc::cpu::set_isa(name.c_str()); }, py::arg("name"),
        "Force the CPU loops' instruction set (tests); False if this CPU cannot run it.");
  m.def(
      "gamut_bins",
      []() {
        constexpr fc::BinCoords c = fc::make_bin_coords();
        py::list l;
        for (int q = 0; q < fc::Q; ++q) l.append(py::make_tuple(c.a[q], c.b[q]));
        return l;
      },
      "The 313 bin centres (a, b) as the kernels see them (checked against fastcolor.gamut by the tests).");

#if FASTCOLOR_WITH_CUDA
  m.def(
      "cuda_soft_encode",
      [](uintptr_t ab, uintptr_t idx, uintptr_t w, int64_t N, int64_t P, int k, double sigma, int device,
         uintptr_t stream) {
        const fc::EncodeArgs a = encode_args(ab, idx, w, N, P, k, sigma);
        cuda_check(fc::cuda::soft_encode(device, ptr<void>(stream), a));
      },
      py::arg("ab"), py::arg("indices"), py::arg("weights"), py::arg("N"), py::arg("P"), py::arg("k"),
      py::arg("sigma"), py::arg("device"), py::arg("stream"), "CUDA version of cpu_soft_encode (asynchronous).");
  m.def(
      "cuda_ce_forward",
      [](uintptr_t logits, int dtype, uintptr_t ab, uintptr_t idx, uintptr_t w, uintptr_t cw, uintptr_t mask,
         uintptr_t pscale, uintptr_t loss, uintptr_t grad, int64_t N, int64_t P, int k, double sigma,
         double grad_scale, int device, uintptr_t stream) {
        const fc::CeArgs a = ce_args(logits, dtype, ab, idx, w, cw, mask, pscale, loss, grad, N, P, k, sigma, grad_scale);
        cuda_check(fc::cuda::ce_forward(device, ptr<void>(stream), a));
      },
      py::arg("logits"), py::arg("dtype"), py::arg("ab"), py::arg("indices"), py::arg("weights"),
      py::arg("class_weights"), py::arg("image_mask"), py::arg("pixel_scale"), py::arg("loss"), py::arg("grad"),
      py::arg("N"), py::arg("P"), py::arg("k"), py::arg("sigma"), py::arg("grad_scale"), py::arg("device"),
      py::arg("stream"), "CUDA version of cpu_ce_forward (asynchronous); precomputed targets only (ab = 0).");
  m.def(
      "cuda_annealed_mean",
      [](uintptr_t x, int dtype, uintptr_t out, int64_t N, int64_t P, double T, bool is_probs, int device,
         uintptr_t stream) {
        const fc::AnnealArgs a = anneal_args(x, dtype, out, N, P, T, is_probs);
        cuda_check(fc::cuda::annealed_mean(device, ptr<void>(stream), a));
      },
      py::arg("x"), py::arg("dtype"), py::arg("out"), py::arg("N"), py::arg("P"), py::arg("T"), py::arg("is_probs"),
      py::arg("device"), py::arg("stream"), "CUDA version of cpu_annealed_mean (asynchronous).");
  m.def("cuda_set_min_blocks", &fc::cuda::set_min_blocks, py::arg("min_blocks"),
        "Benchmarking knob: launch bounds of the loss and annealed-mean kernels, min blocks per SM (4, the default, or 0 = no minimum).");
#endif

  const py::list kernels = kernel_list();
  m.attr("cuda_kernels") = kernels;
  m.attr("has_cuda_kernels") = py::bool_(py::len(kernels) > 0);

  // Report the kernels in build_info() (defined by module.cpp before this call).
  if (py::hasattr(m, "build_info")) {
    py::object base = m.attr("build_info");
    m.attr("build_info") = py::cpp_function(
        [base]() {
          py::dict d = base();
          d["cpu_kernels"] = py::make_tuple("soft_encode", "ce_forward", "annealed_mean");
          d["cpu_isa"] = std::string(fc::cpu::isa());
          d["cuda_kernels"] = kernel_list();
          d["has_cuda_kernels"] = py::bool_(FASTCOLOR_WITH_CUDA != 0);
          return d;
        },
        py::name("build_info"),
        "Compile-time configuration of the extension (compiler, C++ std, OpenMP, CUDA) and its kernels.");
  }
}
