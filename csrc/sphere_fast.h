// sphere_fast: framework-free device API of the CUDA extension.
//
// Everything here takes raw device pointers, sizes, strides, dtype codes and
// an explicit cudaStream_t, and reports failure through a Status value (no
// exceptions, no libtorch). The pybind11 glue in bindings.cpp turns a Status
// into a Python exception.
//
// Layout conventions: the eigensolver works on column-major blocks (cuBLAS's
// native order); the symmetric Gram G is the same matrix in either order.
// The projection takes row-major matrices with an arbitrary row stride (and,
// for the output, an arbitrary column stride).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sphere_fast {

// dtype codes shared with sphere_fast/_cuda.py (_DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

const char* dtype_name(int code);

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument,  // a size, stride, dtype or pointer is not acceptable
  kNonFinite,        // NaN or Inf in an input
  kNotConverged,     // the block eigensolver hit its iteration cap
  kCudaError,        // a CUDA runtime call or kernel launch failed
  kCublasError,      // a cuBLAS call returned an error status
  kCusolverError,    // a cuSOLVER call returned an error status or info != 0
};

struct Status {
  StatusCode code = StatusCode::kOk;
  std::string message;
  bool ok() const { return code == StatusCode::kOk; }
  static Status Ok() { return Status{}; }
  static Status Error(StatusCode c, std::string m) { return Status{c, std::move(m)}; }
};

// ---------------------------------------------------------------------------
// Eigensolver: the top-r eigenpairs of a symmetric PSD matrix with known trace.
// r is the smallest count of leading eigenvalues whose sum passes eta * trace
// (the reference's r = #{k : cumsum_k <= eta * trace} + 1), capped where the
// whole trace is captured (FULL_ENERGY_SLACK), exactly as
// sphere_fast.eigensolver.select_rank.

// "auto" is decided in Python (sphere_fast.eigensolver.plan_auto, shared with
// the torch twin): it arrives here as kDense, or as kBlock with a budget and a
// block cap beyond which the block method gives up and the call goes dense.
enum class EigMethod : int { kDense = 1, kBlock = 2 };

struct EigOptions {
  EigMethod method = EigMethod::kDense;
  double tol = 2e-6;        // accept when ||G u - theta u|| <= tol * theta_1
  int max_iter = 200;       // block iterations before kNotConverged
  bool tf32 = true;         // fp32 G: run the early block iterations on TF32 tensor cores
  uint64_t seed = 0;        // random start / growth columns
  int oversample = 8;       // guard vectors p the block carries past the (previous) rank
  int min_guards = 8;       // pairs are accepted once r + min_guards <= block size
  // The plan of auto (all from sphere_fast.eigensolver): the block method gives
  // up once its cost would pass `budget` (<= 0: no limit) or its block would
  // pass `max_block` columns (<= 0: no cap). One iteration on k columns costs
  // iteration_cost[0] m^2 k + iteration_cost[1] m k^2 + iteration_cost[2] k^3.
  double budget = 0.0;
  int max_block = 0;
  double iteration_cost[3] = {0.0, 0.0, 0.0};
  // The rank rule's slack and a cold start's first block (sphere_fast.eigensolver.FULL_ENERGY_SLACK and
  // COLD_BLOCK): Python is their one source, so they have no defaults here and the solver checks them.
  double full_energy_slack = -1.0;
  int cold_block = 0;
};

// The solver's host-side rules, exported so that tests compare them with sphere_fast.eigensolver's
// select_rank (returns 0 for its None) and iterations_to_converge (previous <= 0: none).
int select_rank(const std::vector<double>& desc, double trace, double eta, bool complete, double full_energy_slack);
double iterations_to_converge(const std::vector<double>& theta, double worst, double previous, int r, int k,
                              double tol);

// The solution, owned in device memory (stream-ordered allocations that are
// released on `stream` when the object is destroyed).
class EigResult {
 public:
  EigResult() = default;
  ~EigResult();
  EigResult(const EigResult&) = delete;
  EigResult& operator=(const EigResult&) = delete;

  int m = 0;
  int rank = 0;
  int dtype = kFloat32;        // working precision of `vectors`
  bool dense = false;          // which method produced it
  int iterations = 0;          // block iterations (0 for dense)
  int tf32_iterations = 0;     // of those, run with TF32 products
  int block_size = 0;          // final block size (m for dense)
  std::vector<double> values;  // host copy, descending, length rank
  std::vector<double> residuals;  // host copy, ||G u_j - theta_j u_j|| (block only)
  cudaStream_t stream = nullptr;
  double* d_values = nullptr;  // rank, descending
  void* d_vectors = nullptr;   // m x rank, column-major, `dtype`

  // Writes values (float64, `rank`) and the vectors as a row-major m x rank
  // matrix with row stride `ld` in `dtype` into caller-owned device memory.
  Status copy_out(double* values_out, void* vectors_out, int64_t ld, cudaStream_t out_stream) const;
};

// G: m x m symmetric, `dtype` kFloat32 or kFloat64, element (i, j) at
//    G[i * ldg + j] (== G[j * ldg + i]); ldg >= m.
// init: optional warm start (nullptr for a cold start; augmented with the
//    largest residual directions G V - V (V^T G V) as the torch twin does): m x k0 with element
//    (i, j) at init[i * init_s0 + j * init_s1], same dtype as G.
// Device memory for the iteration is taken with cudaMallocAsync on `stream`
// and returned to the device's memory pool before the call returns; the pool
// keeps up to detail::kPoolRetainBytes of it between calls instead of handing
// it back to the driver at every synchronisation. On a device without memory
// pools (memory_pools_supported() false) it is cudaMalloc / cudaFree instead.
bool memory_pools_supported();
Status top_eigenpairs(const void* G, int m, int64_t ldg, int dtype, double trace, double eta,
                      const void* init, int k0, int64_t init_s0, int64_t init_s1,
                      const EigOptions& options, cudaStream_t stream,
                      std::unique_ptr<EigResult>* result);

// ---------------------------------------------------------------------------
// Projection: out = [W +] B - alpha (B U) U^T with fp32 accumulation (fp64 when
// B is fp64).
//
// B:   n x d row-major, row stride ldb, any dtype.
// U:   d x r row-major, row stride ldu, dtype acc (kFloat64 iff B is kFloat64,
//      else kFloat32).
// W:   optional (nullptr), n x d with strides (ws0, ws1), dtype out_dtype.
// out: n x d with strides (os0, os1), dtype out_dtype, no two elements at one
//      address. W and B may each be out itself (same pointer, strides and
//      dtype: the in-place update W += ..., or project(B, out=B)); otherwise
//      neither may overlap out. Strides are in elements and >= 1 along a
//      dimension longer than 1; kInvalidArgument where any of this fails.
// T:   workspace n x r, dtype acc, contiguous.
// u_hi, u_lo: workspace d x ldh row-major in B's dtype, ldh >= r (only for
//      fp16/bf16 B; else nullptr): 2^12 U = u_hi + u_lo (the scale keeps fp16's
//      u_lo out of its subnormal range), so B U runs on tensor cores with B read
//      in its own dtype and still carries fp32-level accuracy. The caller picks
//      ldh (a multiple of 8 keeps the GEMM's rows 16-byte aligned).
// t3, u3, C: optional workspaces, all three or none, only for fp16/bf16 B; with
//      them (B U) U^T also runs on tensor cores. T and U are split into bf16
//      halves, t3 = [T_hi T_hi T_lo] (n x ld3 row-major) and u3 = [U_hi U_lo U_hi]
//      (d x ld3), ld3 >= 3r, so one bf16 GEMM with K = 3r gives T U^T to about
//      2^-16 relative (what it drops, T_lo U_lo and the split residuals, is below
//      that), far under a 16-bit output's rounding. It fills C (c_rows x d, fp32,
//      contiguous) c_rows output rows at a time, and an elementwise pass writes
//      each chunk of out once. Without them a tiled fp32 FMA kernel with the same
//      epilogue runs (always for fp32 and fp64 B, whose contract needs fp32 products).
struct ProjectArgs {
  void* out = nullptr;
  int out_dtype = kFloat32;
  int64_t os0 = 0, os1 = 1;
  const void* W = nullptr;
  int64_t ws0 = 0, ws1 = 1;
  const void* B = nullptr;
  int b_dtype = kFloat32;
  int64_t ldb = 0;
  const void* U = nullptr;
  int64_t ldu = 0;
  int64_t n = 0, d = 0, r = 0;
  double alpha = 0.0;
  void* T = nullptr;
  void* u_hi = nullptr;
  void* u_lo = nullptr;
  int64_t ldh = 0;
  void* t3 = nullptr;
  void* u3 = nullptr;
  int64_t ld3 = 0;
  void* C = nullptr;
  int64_t c_rows = 0;
};

Status project(const ProjectArgs& args, cudaStream_t stream);

}  // namespace sphere_fast
