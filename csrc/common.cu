// Status names, dtype names and the per-device handle cache.
#include <unordered_map>

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

int dtype_size(int code) {
  switch (code) {
    case kFloat32: return 4;
    case kFloat64: return 8;
    case kFloat16: return 2;
    case kBFloat16: return 2;
    default: return 0;
  }
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

struct DeviceHandles {
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  // cublasSetStream resets the handle to one default workspace, which GEMMs still
  // running on another stream may be using: each stream gets its own (as in torch).
  std::unordered_map<cudaStream_t, void*> blas_workspace;
};

// cuBLAS's recommended workspace on Hopper (4096 KiB x 8), ample on older GPUs.
constexpr size_t kBlasWorkspaceBytes = size_t(32) << 20;

// One set per thread and device: a handle is bound to a stream per call, so
// threads must not share one. Never destroyed: handles must not be torn down
// after the CUDA runtime has shut down at interpreter exit.
std::unordered_map<int, DeviceHandles>& handle_table() {
  thread_local auto* table = new std::unordered_map<int, DeviceHandles>();
  return *table;
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
  void*& workspace = h.blas_workspace[stream];
  if (workspace == nullptr) SF_CUDA(cudaMalloc(&workspace, kBlasWorkspaceBytes));
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

}  // namespace detail
}  // namespace sphere_fast
