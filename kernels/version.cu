// Placeholder CUDA translation unit: compiled only when CMake finds nvcc.
// Exercises the nvcc + static-cudart path of the build. Host functions only;
// nothing here runs at import time.
#include <cuda_runtime.h>

namespace {
__global__ void fastcolor_selftest_kernel(int* x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = 3 * i + 1;
}
}  // namespace

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

// Launch a trivial kernel and check its result: proves the fatbin has code
// for this GPU and the static runtime works. 0 = ok, -1 = wrong result,
// otherwise the cudaError_t code.
int fastcolor_cuda_selftest() {
  const int n = 1000;
  int* d = nullptr;
  int h[n];
  cudaError_t err = cudaMalloc(&d, n * sizeof(int));
  if (err != cudaSuccess) { (void)cudaGetLastError(); return static_cast<int>(err); }
  fastcolor_selftest_kernel<<<(n + 255) / 256, 256>>>(d, n);
  err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpy(h, d, n * sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(d);
  if (err != cudaSuccess) { (void)cudaGetLastError(); return static_cast<int>(err); }
  for (int i = 0; i < n; ++i)
    if (h[i] != 3 * i + 1) return -1;
  return 0;
}

const char* fastcolor_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
