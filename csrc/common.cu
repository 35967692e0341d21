// Status names, dtype names, the per-thread handle cache and the memory pool set-up.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "common.cuh"

namespace sphere_fast {

const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

bool memory_pools_supported() {
  // SPHERE_FAST_NO_MEMPOOL=1 takes the fallback on any device (tests, diagnosis).
  static const bool forced_off = [] {
    const char* v = std::getenv("SPHERE_FAST_NO_MEMPOOL");
    return v != nullptr && v[0] == '1';
  }();
  if (forced_off) return false;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // zero-initialised: 0 unknown, 1 yes, 2 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return false;
  int state = known[device].load();
  if (state == 0) {
    int value = 0;
    const bool ok = cudaDeviceGetAttribute(&value, cudaDevAttrMemoryPoolsSupported, device) == cudaSuccess;
    state = ok && value != 0 ? 1 : 2;
    known[device].store(state);
  }
  return state == 1;
}

namespace detail {

const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_<unknown>";
  }
}

const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "CUSOLVER_STATUS_<unknown>";
  }
}

namespace {

// cuBLAS's recommended workspace on Hopper (4096 KiB x 8), ample on older GPUs.
constexpr size_t kBlasWorkspaceBytes = size_t(32) << 20;

struct DeviceHandles {
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  // cublasSetStream resets the handle to one default workspace, which GEMMs still
  // running on another stream may be using: each stream gets its own (as in
  // torch), most recently used first, at most kMaxBlasWorkspaces of them.
  std::vector<std::pair<cudaStream_t, void*>> workspaces;
};

// One set per thread and device: a handle is bound to a stream per call, so
// threads must not share one. Released when the thread exits; for the main
// thread that happens in exit() before any atexit handler or static
// destructor runs, so while the CUDA runtime is still up.
class HandleTable {
 public:
  HandleTable() = default;
  HandleTable(const HandleTable&) = delete;
  HandleTable& operator=(const HandleTable&) = delete;
  ~HandleTable() {
    for (auto& entry : devices_) {
      DeviceHandles& h = entry.second;
      if (cudaSetDevice(entry.first) != cudaSuccess) continue;
      // cublasDestroy synchronises the device: the workspaces are idle after it.
      if (h.blas != nullptr) cublasDestroy(h.blas);
      if (h.solver != nullptr) cusolverDnDestroy(h.solver);
      for (auto& ws : h.workspaces) cudaFree(ws.second);
    }
  }
  DeviceHandles& operator[](int device) { return devices_[device]; }

 private:
  std::unordered_map<int, DeviceHandles> devices_;
};

HandleTable& handle_table() {
  thread_local HandleTable table;
  return table;
}

// The workspace of `stream`, moved to the front; a new one evicts the least
// recently used beyond kMaxBlasWorkspaces (after a device synchronisation, as
// GEMMs queued on its stream may still read it).
Status stream_workspace(DeviceHandles& h, cudaStream_t stream, void** out) {
  auto& list = h.workspaces;
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i].first == stream) {
      std::rotate(list.begin(), list.begin() + i, list.begin() + i + 1);
      *out = list.front().second;
      return Status::Ok();
    }
  }
  if (list.size() >= static_cast<size_t>(kMaxBlasWorkspaces)) {
    SF_CUDA(cudaDeviceSynchronize());
    SF_CUDA(cudaFree(list.back().second));
    list.pop_back();
  }
  void* workspace = nullptr;
  SF_CUDA(cudaMalloc(&workspace, kBlasWorkspaceBytes));
  list.insert(list.begin(), {stream, workspace});
  *out = workspace;
  return Status::Ok();
}

}  // namespace

Status blas_handle(cudaStream_t stream, cublasHandle_t* out) {
  int device = 0;
  SF_CUDA(cudaGetDevice(&device));
  DeviceHandles& h = handle_table()[device];
  if (h.blas == nullptr) {
    SF_CUBLAS(cublasCreate(&h.blas));
    SF_CUBLAS(cublasSetPointerMode(h.blas, CUBLAS_POINTER_MODE_HOST));
  }
  SF_CUBLAS(cublasSetStream(h.blas, stream));
  void* workspace = nullptr;
  SF_RETURN_IF_ERROR(stream_workspace(h, stream, &workspace));
  SF_CUBLAS(cublasSetWorkspace(h.blas, workspace, kBlasWorkspaceBytes));
  *out = h.blas;
  return Status::Ok();
}

Status solver_handle(cudaStream_t stream, cusolverDnHandle_t* out) {
  int device = 0;
  SF_CUDA(cudaGetDevice(&device));
  DeviceHandles& h = handle_table()[device];
  if (h.solver == nullptr) SF_CUSOLVER(cusolverDnCreate(&h.solver));
  SF_CUSOLVER(cusolverDnSetStream(h.solver, stream));
  *out = h.solver;
  return Status::Ok();
}

cudaError_t device_malloc(void** ptr, size_t bytes, cudaStream_t stream) {
  return sphere_fast::memory_pools_supported() ? cudaMallocAsync(ptr, bytes, stream) : cudaMalloc(ptr, bytes);
}

void device_free(void* ptr, cudaStream_t stream) {
  if (ptr == nullptr) return;
  if (sphere_fast::memory_pools_supported()) {
    cudaFreeAsync(ptr, stream);
  } else {
    cudaStreamSynchronize(stream);  // work queued on the stream may still read it
    cudaFree(ptr);
  }
}

Status retain_pool_memory() {
  static std::mutex mutex;
  static std::unordered_set<int> done;
  int device = 0;
  SF_CUDA(cudaGetDevice(&device));
  if (!sphere_fast::memory_pools_supported()) return Status::Ok();
  std::lock_guard<std::mutex> lock(mutex);
  if (done.count(device)) return Status::Ok();
  cudaMemPool_t pool;
  SF_CUDA(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t threshold = 0;
  SF_CUDA(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  if (threshold < kPoolRetainBytes) {
    threshold = kPoolRetainBytes;
    SF_CUDA(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  }
  done.insert(device);
  return Status::Ok();
}

}  // namespace detail
}  // namespace sphere_fast
