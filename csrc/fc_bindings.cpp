// pybind11 bindings of the fastcolor kernels (backends "cpp" and "cuda").
//
// No libtorch: the bindings take torch tensors as plain Python objects and read what they need
// through the tensor's Python API (data_ptr(), shape, dtype, is_contiguous(), is_cuda,
// get_device()); they check dtypes, shapes, contiguity and devices, fill the parameter struct
// of the call (kernels/fc_api.cuh) and run the CPU loops (GIL released) or launch the CUDA
// kernels on the stream passed in (torch.cuda.current_stream().cuda_stream, as an int). The
// tensors' device picks the implementation. The Python side is
// fastcolor/backends/compiled_backend.py:
//
//   soft_encode(ab, indices, weights, table, centres, sigma, nthreads=0, stream=0)
//   ce_forward(call, loss, grad, table=None, centres=None, nthreads=0, stream=0)
//   annealed_mean(x, out, centres, T, is_probs, nthreads=0, stream=0)
//
// `table` is a fastcolor.backends._tables.DeviceTable (offsets, bins, lo, cell, n, max_len),
// `centres` the (313, 2) float32 bin centres (_tables.bin_centres), `call` a
// fastcolor.backends.contract.LossCall whose tensors are contiguous float32 (int32 indices).
//
// register_kernels(m) is called from PYBIND11_MODULE in csrc/module.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "fc_api.cuh"

#ifndef FASTCOLOR_WITH_CUDA
#define FASTCOLOR_WITH_CUDA 0
#endif

namespace py = pybind11;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument("fastcolor._C: " + msg); }

// What the kernels need of one torch tensor (or of None: given = false).
struct Tensor {
  std::string name;
  bool given = false;
  uintptr_t ptr = 0;
  std::vector<int64_t> shape;
  std::string dtype;  // "float32", "int32", ...
  bool cuda = false;
  int device = -1;  // CUDA device index, -1 on the CPU

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  std::string where() const { return cuda ? "cuda:" + std::to_string(device) : "cpu"; }
  std::string shape_str() const {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
  }

  // Require dtype and shape (-1: any size on that axis).
  const Tensor& expect(const char* want_dtype, std::initializer_list<int64_t> want_shape) const {
    if (dtype != want_dtype) fail(name + ": expected " + want_dtype + ", got " + dtype);
    bool ok = shape.size() == want_shape.size();
    size_t i = 0;
    for (int64_t s : want_shape) ok = ok && (s < 0 || (i < shape.size() && shape[i] == s)), ++i;
    if (!ok) {
      std::string w = "(";
      i = 0;
      for (int64_t s : want_shape) w += (i++ ? ", " : "") + (s < 0 ? std::string("*") : std::to_string(s));
      fail(name + ": expected shape " + w + (want_shape.size() == 1 ? ",)" : ")") + ", got " + shape_str());
    }
    return *this;
  }
  const Tensor& on(const Tensor& ref) const {
    if (cuda != ref.cuda || device != ref.device)
      fail(name + " is on " + where() + " but " + ref.name + " is on " + ref.where());
    return *this;
  }
  template <typename T>
  T* data() const {
    return reinterpret_cast<T*>(ptr);
  }
};

Tensor tensor(py::handle t, const std::string& name, bool optional = false) {
  Tensor r;
  r.name = name;
  if (t.is_none()) {
    if (!optional) fail(name + ": expected a tensor, got None");
    return r;
  }
  if (!py::hasattr(t, "data_ptr") || !py::hasattr(t, "shape") || !py::hasattr(t, "dtype"))
    fail(name + ": expected a torch.Tensor, got " + std::string(py::str(py::type::of(t))));
  r.given = true;
  for (py::handle s : t.attr("shape")) r.shape.push_back(s.cast<int64_t>());
  std::string dt = py::str(t.attr("dtype"));
  r.dtype = dt.rfind("torch.", 0) == 0 ? dt.substr(6) : dt;
  r.cuda = t.attr("is_cuda").cast<bool>();
  r.device = r.cuda ? t.attr("get_device")().cast<int>() : -1;
  if (!t.attr("is_contiguous")().cast<bool>()) fail(name + ": expected a contiguous tensor");
  r.ptr = t.attr("data_ptr")().cast<uintptr_t>();
  if (r.ptr == 0 && r.numel() > 0) fail(name + ": null data pointer");
  return r;
}

int dtype_code(const Tensor& t) {
  if (t.dtype == "float32") return fc::kF32;
  if (t.dtype == "float16") return fc::kF16;
  if (t.dtype == "bfloat16") return fc::kBF16;
  fail(t.name + ": expected float32, float16 or bfloat16, got " + t.dtype);
}

void check_k(int64_t k) {
  if (k < 1 || k > fc::K_MAX) fail("k must be in 1.." + std::to_string(fc::K_MAX) + ", got " + std::to_string(k));
}

// The candidate table (a DeviceTable) and the bin centres, on the device of `ref`.
fc::GamutTable gamut_table(py::handle table, py::handle centres, const Tensor& ref) {
  const Tensor c = tensor(centres, "centres");
  c.expect("float32", {fc::Q, 2}).on(ref);
  fc::GamutTable g{};
  g.centres = c.data<const float>();
  if (table.is_none()) return g;  // annealed mean, precomputed targets: centres only
  if (!py::hasattr(table, "offsets") || !py::hasattr(table, "bins"))
    fail("table: expected a fastcolor.backends._tables.DeviceTable");
  g.n = table.attr("n").cast<int>();
  g.lo = table.attr("lo").cast<float>();
  g.cell = table.attr("cell").cast<float>();
  g.max_len = table.attr("max_len").cast<int>();
  g.hi = (float)((double)g.lo + (double)g.n * (double)g.cell);
  if (g.n < 1 || !(g.cell > 0) || g.max_len < 1) fail("table: bad geometry");
  const Tensor off = tensor(table.attr("offsets"), "table.offsets");
  off.expect("int32", {(int64_t)g.n * g.n + 1}).on(ref);
  const Tensor bins = tensor(table.attr("bins"), "table.bins");
  bins.expect("int16", {-1}).on(ref);
  // The CPU loops read the int16 entries through aligned 32-bit words (csrc/fc_encode.cpp).
  if (bins.ptr % 4 != 0) fail("table.bins: expected a 4-byte aligned tensor");
  g.offsets = off.data<const int32_t>();
  g.bins = bins.data<const int16_t>();
  return g;
}

fc::EncodeSpec encode_spec(py::handle table, py::handle centres, const Tensor& ref, int64_t k, double sigma) {
  check_k(k);
  if (!(sigma > 0)) fail("sigma must be positive");
  if (table.is_none()) fail("table: required to soft-encode ab");
  fc::EncodeSpec s{};
  s.table = gamut_table(table, centres, ref);
  s.k = (int)k;
  s.neg_inv_2s2 = -1.0 / (2.0 * sigma * sigma);
  s.two_s2 = 2.0 * sigma * sigma;
  return s;
}

#if FASTCOLOR_WITH_CUDA
void cuda_check(const char* err) {
  if (err) throw std::runtime_error(std::string("fastcolor._C CUDA error: ") + err);
}

void* stream_ptr(uintptr_t s) { return reinterpret_cast<void*>(s); }
#endif

#if !FASTCOLOR_WITH_CUDA
[[noreturn]] void no_cuda() { fail("CUDA tensors given, but this build has no CUDA kernels"); }
#endif

// ------------------------------------------------------------------------------ the three ops
void soft_encode(py::handle ab_, py::handle idx_, py::handle w_, py::handle table, py::handle centres, double sigma,
                 int nthreads, uintptr_t stream) {
  const Tensor ab = tensor(ab_, "ab");
  ab.expect("float32", {-1, 2, -1});
  const int64_t N = ab.shape[0], P = ab.shape[2];
  const Tensor idx = tensor(idx_, "indices");
  idx.expect("int32", {N, -1, P}).on(ab);
  const int64_t k = idx.shape[1];
  const Tensor w = tensor(w_, "weights");
  w.expect("float32", {N, k, P}).on(ab);
  fc::EncodeParams p{};
  p.ab = ab.data<const float>();
  p.idx = idx.data<int32_t>();
  p.w = w.data<float>();
  p.N = N;
  p.P = P;
  p.enc = encode_spec(table, centres, ab, k, sigma);
  if (N * P == 0) return;
  if (ab.cuda) {
#if FASTCOLOR_WITH_CUDA
    cuda_check(fc::cuda::soft_encode(ab.device, stream_ptr(stream), p));
#else
    no_cuda();
#endif
    return;
  }
  py::gil_scoped_release nogil;
  fc::cpu::soft_encode(p, nthreads);
}

void ce_forward(py::handle call, py::handle loss_, py::handle grad_, py::handle table, py::handle centres,
                int nthreads, uintptr_t stream) {
  const Tensor x = tensor(call.attr("logits"), "call.logits");
  x.expect(x.dtype.c_str(), {-1, fc::Q, -1});
  fc::LossParams p{};
  p.dtype = dtype_code(x);
  p.logits = x.data<const void>();
  const int64_t N = x.shape[0], P = x.shape[2];
  p.N = N;
  p.P = P;
  const int64_t k = call.attr("k").cast<int64_t>();
  check_k(k);
  p.k = (int)k;
  p.grad_scale = (float)call.attr("grad_scale").cast<double>();

  const Tensor ab = tensor(call.attr("ab"), "call.ab", true);
  const Tensor idx = tensor(call.attr("indices"), "call.indices", true);
  const Tensor w = tensor(call.attr("weights"), "call.weights", true);
  if (ab.given == idx.given) fail("call: expected exactly one of ab and indices");
  if (idx.given != w.given) fail("call: indices and weights come together");
  if (ab.given) {
    ab.expect("float32", {N, 2, P}).on(x);
    p.ab = ab.data<const float>();
    p.enc = encode_spec(table, centres, x, k, call.attr("sigma").cast<double>());
  } else {
    idx.expect("int32", {N, k, P}).on(x);
    w.expect("float32", {N, k, P}).on(x);
    p.idx = idx.data<const int32_t>();
    p.w = w.data<const float>();
  }
  const Tensor cw = tensor(call.attr("class_weights"), "call.class_weights", true);
  if (cw.given) p.cw = cw.expect("float32", {fc::Q}).on(x).data<const float>();
  const Tensor m = tensor(call.attr("image_mask"), "call.image_mask", true);
  if (m.given) p.mask = m.expect("float32", {N}).on(x).data<const float>();
  const Tensor ps = tensor(call.attr("pixel_scale"), "call.pixel_scale", true);
  if (ps.given) p.pscale = ps.expect("float32", {N, P}).on(x).data<const float>();
  const Tensor loss = tensor(loss_, "loss");
  p.loss = loss.expect("float32", {N, P}).on(x).data<float>();
  const Tensor grad = tensor(grad_, "grad", true);
  if (grad.given) p.grad = grad.expect(x.dtype.c_str(), {N, fc::Q, P}).on(x).data<void>();
  if (N * P == 0) return;
  if (x.cuda) {
#if FASTCOLOR_WITH_CUDA
    cuda_check(fc::cuda::ce_forward(x.device, stream_ptr(stream), p));
#else
    no_cuda();
#endif
    return;
  }
  py::gil_scoped_release nogil;
  fc::cpu::ce_forward(p, nthreads);
}

void annealed_mean(py::handle x_, py::handle out_, py::handle centres, double T, bool is_probs, int nthreads,
                   uintptr_t stream) {
  const Tensor x = tensor(x_, "x");
  x.expect(x.dtype.c_str(), {-1, fc::Q, -1});
  fc::AnnealParams p{};
  p.dtype = dtype_code(x);
  p.x = x.data<const void>();
  p.N = x.shape[0];
  p.P = x.shape[2];
  p.out = tensor(out_, "out").expect("float32", {p.N, 2, p.P}).on(x).data<float>();
  p.centres = gamut_table(py::none(), centres, x).centres;
  if (!(T >= 1e-6)) fail("T must be >= 1e-6");
  p.inv_T = (float)(1.0 / T);
  p.is_probs = is_probs;
  if (p.N * p.P == 0) return;
  if (x.cuda) {
#if FASTCOLOR_WITH_CUDA
    cuda_check(fc::cuda::annealed_mean(x.device, stream_ptr(stream), p));
#else
    no_cuda();
#endif
    return;
  }
  py::gil_scoped_release nogil;
  fc::cpu::annealed_mean(p, nthreads);
}

// grad *= factor on the device (CUDA tensors only: the CPU backends read the factor on the host).
void scale(py::handle grad_, py::handle factor_, uintptr_t stream) {
  const Tensor g = tensor(grad_, "grad");
  if (!g.cuda) fail("grad: scale_ is the CUDA kernel; expected a CUDA tensor, got one on " + g.where());
  fc::ScaleParams p{};
  p.dtype = dtype_code(g);
  p.grad = g.data<void>();
  p.n = g.numel();
  p.factor = tensor(factor_, "factor").expect("float32", {1}).on(g).data<const float>();
#if FASTCOLOR_WITH_CUDA
  cuda_check(fc::cuda::scale(g.device, stream_ptr(stream), p));
#else
  no_cuda();
#endif
}

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

F32Array map_array(const F32Array& in, void (*fn)(const float*, float*, int64_t)) {
  F32Array out(std::vector<py::ssize_t>(in.shape(), in.shape() + in.ndim()));
  fn(in.data(), out.mutable_data(), (int64_t)in.size());
  return out;
}

py::list kernel_list() {
  py::list l;
#if FASTCOLOR_WITH_CUDA
  for (const char* const* n = fc::cuda::kernel_names(); *n; ++n) l.append(*n);
#endif
  return l;
}

}  // namespace

void register_kernels(py::module_& m) {
  m.def("soft_encode", &soft_encode, py::arg("ab"), py::arg("indices"), py::arg("weights"), py::arg("table"),
        py::arg("centres"), py::arg("sigma"), py::kw_only(), py::arg("nthreads") = 0, py::arg("stream") = 0,
        "Soft-encode float32 ab (N, 2, P) into the int32 indices and float32 weights (N, k, P) given "
        "(k = their axis 1), with the candidate table of that k and the bin centres, on the tensors' device.");
  m.def("ce_forward", &ce_forward, py::arg("call"), py::arg("loss"), py::arg("grad"), py::arg("table") = py::none(),
        py::arg("centres") = py::none(), py::kw_only(), py::arg("nthreads") = 0, py::arg("stream") = 0,
        "Fused (soft-encoding +) class-rebalanced cross-entropy of a LossCall: per-pixel loss (N, P) into "
        "`loss` and, if `grad` is a tensor, the gradient (N, 313, P) in the logits' dtype. `table` and "
        "`centres` are needed when call.ab is given (CPU only: on CUDA, soft-encode first).");
  m.def("annealed_mean", &annealed_mean, py::arg("x"), py::arg("out"), py::arg("centres"), py::arg("T"),
        py::arg("is_probs"), py::kw_only(), py::arg("nthreads") = 0, py::arg("stream") = 0,
        "Annealed mean of (N, 313, P) logits or probabilities into float32 ab `out` (N, 2, P).");
  m.def("scale_", &scale, py::arg("grad"), py::arg("factor"), py::kw_only(), py::arg("stream") = 0,
        "grad *= factor in place on the tensors' CUDA device, factor a float32 (1,) tensor read by the kernel "
        "(nothing moves when it is 1).");
  m.def(
      "cpu_exp", [](const F32Array& x) { return map_array(x, fc::cpu::exp_array); }, py::arg("x"),
      "exp_ of kernels/fc_math.cuh over a float32 array, with the current CPU instruction set (tests).");
  m.def(
      "cpu_log", [](const F32Array& x) { return map_array(x, fc::cpu::log_array); }, py::arg("x"),
      "log_ of kernels/fc_math.cuh over a float32 array, with the current CPU instruction set (tests).");
  m.def("cpu_isa", []() { return std::string(fc::cpu::isa()); },
        "Instruction set the CPU loops run with: 'avx512', 'avx2' or 'default'.");
  m.def("cpu_set_isa", [](const std::string& name) { return fc::cpu::set_isa(name.c_str()); }, py::arg("name"),
        "Force the CPU loops' instruction set (tests); False if this CPU cannot run it.");
#if FASTCOLOR_WITH_CUDA
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
