// Internal helpers shared by the .cu files: status propagation, stream-ordered
// device buffers, and cached cuBLAS / cuSOLVER handles per device.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstdint>
#include <string>
#include <utility>

#include "sphere_fast.h"

namespace sphere_fast {
namespace detail {

const char* cublas_status_name(cublasStatus_t s);
const char* cusolver_status_name(cusolverStatus_t s);

// A failed runtime call (cudaMalloc too) also leaves its error for cudaGetLastError: clear it, or the next
// launch_status would report it again after its kernel ran.
inline Status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  (void)cudaGetLastError();
  return Status::Error(StatusCode::kCudaError,
                       std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

inline Status cublas_status(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return Status::Ok();
  return Status::Error(StatusCode::kCublasError, std::string(what) + ": " + cublas_status_name(s));
}

inline Status cusolver_status(cusolverStatus_t s, const char* what) {
  if (s == CUSOLVER_STATUS_SUCCESS) return Status::Ok();
  return Status::Error(StatusCode::kCusolverError, std::string(what) + ": " + cusolver_status_name(s));
}

// The last launch's error, if any (launch configuration errors and earlier
// asynchronous faults).
inline Status launch_status(const char* kernel) { return cuda_status(cudaGetLastError(), kernel); }

// At the entry of a public call: an error an earlier, unrelated call left behind is not this call's to report.
inline void clear_stale_error() { (void)cudaGetLastError(); }

#define SF_RETURN_IF_ERROR(expr)           \
  do {                                     \
    ::sphere_fast::Status _sf_s = (expr);  \
    if (!_sf_s.ok()) return _sf_s;         \
  } while (0)
#define SF_CUDA(expr) SF_RETURN_IF_ERROR(::sphere_fast::detail::cuda_status((expr), #expr))
#define SF_CUBLAS(expr) SF_RETURN_IF_ERROR(::sphere_fast::detail::cublas_status((expr), #expr))
#define SF_CUSOLVER(expr) SF_RETURN_IF_ERROR(::sphere_fast::detail::cusolver_status((expr), #expr))

// Stream-ordered allocation where the device has memory pools
// (sphere_fast::memory_pools_supported: cudaMallocAsync / cudaFreeAsync); elsewhere (some virtualised devices
// report none) plain cudaMalloc, and cudaFree after the stream is done.
cudaError_t device_malloc(void** ptr, size_t bytes, cudaStream_t stream);
void device_free(void* ptr, cudaStream_t stream);

// A device allocation taken on a stream and released on the same stream
// (stream-ordered: safe while earlier work still runs).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      ptr_ = o.ptr_;
      bytes_ = o.bytes_;
      stream_ = o.stream_;
      o.ptr_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }

  Status allocate(size_t bytes, cudaStream_t stream) {
    reset();
    stream_ = stream;
    if (bytes == 0) return Status::Ok();
    cudaError_t err = device_malloc(&ptr_, bytes, stream);
    if (err != cudaSuccess) {
      ptr_ = nullptr;
      return cuda_status(err, ("device allocation of " + std::to_string(bytes) + " bytes").c_str());
    }
    bytes_ = bytes;
    return Status::Ok();
  }
  void swap(DeviceBuffer& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    std::swap(stream_, o.stream_);
  }
  // Keeps the current allocation when it holds `bytes` (contents are not
  // preserved when it has to grow): scratch reused across iterations.
  Status ensure(size_t bytes, cudaStream_t stream) {
    if (ptr_ != nullptr && bytes <= bytes_ && stream == stream_) return Status::Ok();
    return allocate(bytes, stream);
  }
  void reset() {
    if (ptr_ != nullptr) device_free(ptr_, stream_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  // Hands the allocation to the caller, who frees it with device_free.
  void* release() {
    void* p = ptr_;
    ptr_ = nullptr;
    bytes_ = 0;
    return p;
  }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
};

// cuBLAS and cuSOLVER handles for the current device and calling thread,
// created once and bound to `stream` on every request (host pointer mode,
// default math mode). Each thread's handles and cuBLAS workspaces are released
// when the thread exits; a thread keeps workspaces for its kMaxBlasWorkspaces
// most recently used streams.
constexpr int kMaxBlasWorkspaces = 4;
Status blas_handle(cudaStream_t stream, cublasHandle_t* out);
Status solver_handle(cudaStream_t stream, cusolverDnHandle_t* out);

// Once per device: let its default memory pool (where DeviceBuffer allocates)
// keep up to kPoolRetainBytes of freed memory instead of returning it to the
// driver at every synchronisation (the default threshold is 0). A threshold
// someone else set higher is left alone.
constexpr uint64_t kPoolRetainBytes = uint64_t(512) << 20;
Status retain_pool_memory();

inline unsigned int blocks_for(int64_t count, int threads, unsigned int cap = 65535u * 8u) {
  int64_t b = (count + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > static_cast<int64_t>(cap)) b = cap;
  return static_cast<unsigned int>(b);
}

// A launch over a rows x cols matrix for kernels that stride rows along y and
// columns along x in grid-stride loops, so no thread divides a flat index:
// x spans the columns up to `threads` wide (at least a warp), y takes the rest
// of the block; both grid dimensions are capped, the loops cover the remainder.
struct Launch2d {
  dim3 grid, block;
};
inline Launch2d launch_2d(int64_t rows, int64_t cols, int threads = 256) {
  int tx = 32;
  while (tx < threads && tx < cols) tx *= 2;
  const int ty = threads / tx;
  return {dim3(blocks_for(cols, tx, 4096), blocks_for(rows, ty, 65535)), dim3(tx, ty)};
}

// Inside a kernel launched with launch_2d: f(i, j) for this thread's share of
// rows i < rows and columns j < cols, in the grid-stride loops described above.
template <typename F>
__device__ __forceinline__ void for_each_2d(int64_t rows, int64_t cols, F&& f) {
  for (int64_t i = blockIdx.y * static_cast<int64_t>(blockDim.y) + threadIdx.y; i < rows;
       i += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < cols;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      f(i, j);
    }
  }
}

}  // namespace detail
}  // namespace sphere_fast
