// fastcolor._C: pybind11 module. Deliberately does NOT link libtorch: the kernels' bindings
// (csrc/fc_bindings.cpp) read the tensors' data pointers, shapes and dtypes through their
// Python API, so one binary works across PyTorch versions.
#include <pybind11/pybind11.h>

#include <string>

#include "fastcolor_build_config.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef FASTCOLOR_WITH_CUDA
#define FASTCOLOR_WITH_CUDA 0
#endif

#if FASTCOLOR_WITH_CUDA
// Defined in kernels/version.cu (compiled by nvcc).
extern "C" int fastcolor_cudart_version_compiled();
extern "C" int fastcolor_cuda_runtime_version();
extern "C" int fastcolor_cuda_driver_version();
extern "C" int fastcolor_cuda_device_count();
extern "C" int fastcolor_cuda_selftest();
extern "C" const char* fastcolor_cuda_error_string(int code);
#endif

namespace py = pybind11;

// The kernels' bindings (csrc/fc_bindings.cpp): soft_encode, ce_forward, annealed_mean, cpu_*, cuda_*.
void register_kernels(py::module_& m);

namespace {

std::string cxx_standard() {
#if __cplusplus >= 202002L
  return "c++20";
#elif __cplusplus >= 201703L
  return "c++17";
#else
  return "c++14";
#endif
}

// Pure metadata: makes no CUDA call (safe without a GPU or driver).
py::dict build_info() {
  py::dict d;
  d["compiler_id"] = FASTCOLOR_CXX_COMPILER_ID;
  d["compiler_version"] = FASTCOLOR_CXX_COMPILER_VERSION;
  d["compiler"] = std::string(FASTCOLOR_CXX_COMPILER_ID) + " " + FASTCOLOR_CXX_COMPILER_VERSION;
  d["cxx_standard"] = cxx_standard();
  d["cplusplus"] = static_cast<long>(__cplusplus);
  d["build_type"] = FASTCOLOR_BUILD_TYPE;
  d["cpu_flags"] = FASTCOLOR_CPU_FLAGS;
  d["cmake_version"] = FASTCOLOR_CMAKE_VERSION;
  d["pybind11_version"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                          std::to_string(PYBIND11_VERSION_MINOR) + "." +
                          std::to_string(PYBIND11_VERSION_PATCH);
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_version"] = static_cast<int>(_OPENMP);
#else
  d["openmp"] = false;
  d["openmp_version"] = py::none();
#endif
#if FASTCOLOR_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = FASTCOLOR_CUDA_ARCHS;
  d["nvcc_version"] = FASTCOLOR_NVCC_VERSION;
  d["cudart_version"] = fastcolor_cudart_version_compiled();  // compile-time constant
  d["cudart_static"] = true;
#else
  d["cuda"] = false;
  d["cuda_archs"] = py::none();
  d["nvcc_version"] = py::none();
  d["cudart_version"] = py::none();
  d["cudart_static"] = py::none();
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcolor native kernels (C++/OpenMP, optional CUDA); no libtorch dependency";
  m.def("build_info", &build_info,
        "Compile-time configuration of the extension (compiler, C++ std, OpenMP, CUDA).");
  m.attr("has_cuda") = py::bool_(FASTCOLOR_WITH_CUDA != 0);
#ifdef _OPENMP
  m.def("openmp_max_threads", []() { return omp_get_max_threads(); });
#endif
#if FASTCOLOR_WITH_CUDA
  // These call the CUDA runtime: only on demand, never at import.
  m.def("cuda_runtime_version", &fastcolor_cuda_runtime_version,
        "cudaRuntimeGetVersion() of the statically linked runtime (-1 on error).");
  m.def("cuda_driver_version", &fastcolor_cuda_driver_version,
        "cudaDriverGetVersion(); 0 when no driver is installed.");
  m.def("cuda_device_count", &fastcolor_cuda_device_count,
        "cudaGetDeviceCount(); 0 when no driver/GPU.");
  m.def("cuda_selftest", []() -> std::string {
        const int rc = fastcolor_cuda_selftest();
        if (rc == 0) return "ok";
        if (rc == -1) return "wrong result";
        return fastcolor_cuda_error_string(rc);
      },
        "Launch a tiny kernel on the current device; 'ok' or the CUDA error text.");
#endif
  register_kernels(m);  // after build_info: it adds the kernel list to build_info()
}
