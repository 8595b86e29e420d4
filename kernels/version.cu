// Placeholder CUDA translation unit: compiled only when CMake finds nvcc.
// Exercises the nvcc + static-cudart path of the build. Host functions only;
// nothing here runs at import time.
#include <cuda_runtime_api.h>

extern "C" {

// CUDART_VERSION of the toolkit this was compiled against (no CUDA call).
int fastcolor_cudart_version_compiled() { return CUDART_VERSION; }

// Version of the (statically linked) CUDA runtime, or -1 on error.
int fastcolor_cuda_runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : -1;
}

// Latest CUDA version supported by the installed driver; 0 if no driver.
int fastcolor_cuda_driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

// Number of visible CUDA devices; 0 when no driver/GPU (error is cleared).
int fastcolor_cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

}  // extern "C"
