// pybind11 glue for sphere_fast._C: raw device pointers, sizes, strides, dtype
// codes and the CUDA stream come in as Python ints; a failed Status becomes a
// Python exception (ValueError for bad arguments and non-finite input,
// sphere_fast.eigensolver.ConvergenceError for non-convergence, RuntimeError
// for CUDA / cuBLAS / cuSOLVER failures). No libtorch: sphere_fast/_cuda.py
// owns tensors, checks them and passes their data_ptr().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>

#include "sphere_fast.h"

namespace py = pybind11;
using namespace sphere_fast;

namespace {

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

template <typename P>
P as_ptr(uintptr_t address) {
  return reinterpret_cast<P>(address);
}

[[noreturn]] void raise_status(const Status& s, const char* where) {
  const std::string msg = std::string(where) + ": " + s.message;
  switch (s.code) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kNonFinite:
      throw py::value_error(msg);
    case StatusCode::kNotConverged: {
      py::object cls;
      try {
        cls = py::module_::import("sphere_fast.eigensolver").attr("ConvergenceError");
      } catch (py::error_already_set&) {
        throw std::runtime_error(msg);
      }
      PyErr_SetString(cls.ptr(), msg.c_str());
      throw py::error_already_set();
    }
    case StatusCode::kCudaError:
      throw std::runtime_error(msg + " [CUDA]");
    case StatusCode::kCublasError:
      throw std::runtime_error(msg + " [cuBLAS]");
    case StatusCode::kCusolverError:
      throw std::runtime_error(msg + " [cuSOLVER]");
    default:
      throw std::runtime_error(msg);
  }
}

// "auto" is planned in Python (sphere_fast.eigensolver.plan_auto) and arrives as one of these.
EigMethod parse_method(const std::string& method) {
  if (method == "dense") return EigMethod::kDense;
  if (method == "block") return EigMethod::kBlock;
  throw py::value_error("method must be 'dense' or 'block' (auto is planned by sphere_fast._cuda); got '" + method +
                        "'");
}

std::unique_ptr<EigResult> eigensolve(uintptr_t G, int m, int64_t ldg, int dtype, double trace, double eta,
                                      const std::string& method, uintptr_t init, int k0, int64_t init_s0,
                                      int64_t init_s1, double tol, int max_iter, bool tf32, uint64_t seed,
                                      int oversample, int min_guards, double budget, int max_block,
                                      const std::array<double, 3>& iteration_cost, double full_energy_slack,
                                      int cold_block, uintptr_t stream) {
  EigOptions opt;
  opt.method = parse_method(method);
  opt.tol = tol;
  opt.max_iter = max_iter;
  opt.tf32 = tf32;
  opt.seed = seed;
  opt.oversample = oversample;
  opt.min_guards = min_guards;
  opt.budget = budget;
  opt.max_block = max_block;
  for (int i = 0; i < 3; ++i) opt.iteration_cost[i] = iteration_cost[i];
  opt.full_energy_slack = full_energy_slack;
  opt.cold_block = cold_block;
  std::unique_ptr<EigResult> result;
  Status s;
  {
    py::gil_scoped_release release;
    s = top_eigenpairs(as_ptr<const void*>(G), m, ldg, dtype, trace, eta, as_ptr<const void*>(init), k0, init_s0,
                       init_s1, opt, as_stream(stream), &result);
  }
  if (!s.ok()) raise_status(s, "top_eigenpairs");
  return result;
}

void eig_copy_out(const EigResult& self, uintptr_t values, uintptr_t vectors, int64_t ld, uintptr_t stream) {
  Status s;
  {
    py::gil_scoped_release release;
    s = self.copy_out(as_ptr<double*>(values), as_ptr<void*>(vectors), ld, as_stream(stream));
  }
  if (!s.ok()) raise_status(s, "EigResult.copy_out");
}

void project_py(uintptr_t out, int out_dtype, int64_t os0, int64_t os1, uintptr_t W, int64_t ws0, int64_t ws1,
                uintptr_t B, int b_dtype, int64_t ldb, uintptr_t U, int64_t ldu, int64_t n, int64_t d, int64_t r,
                double alpha, uintptr_t T, uintptr_t u_hi, uintptr_t u_lo, int64_t ldh, uintptr_t t3, uintptr_t u3,
                int64_t ld3, uintptr_t C, int64_t c_rows, uintptr_t stream) {
  ProjectArgs a;
  a.out = as_ptr<void*>(out);
  a.out_dtype = out_dtype;
  a.os0 = os0;
  a.os1 = os1;
  a.W = as_ptr<const void*>(W);
  a.ws0 = ws0;
  a.ws1 = ws1;
  a.B = as_ptr<const void*>(B);
  a.b_dtype = b_dtype;
  a.ldb = ldb;
  a.U = as_ptr<const void*>(U);
  a.ldu = ldu;
  a.n = n;
  a.d = d;
  a.r = r;
  a.alpha = alpha;
  a.T = as_ptr<void*>(T);
  a.u_hi = as_ptr<void*>(u_hi);
  a.u_lo = as_ptr<void*>(u_lo);
  a.ldh = ldh;
  a.t3 = as_ptr<void*>(t3);
  a.u3 = as_ptr<void*>(u3);
  a.ld3 = ld3;
  a.C = as_ptr<void*>(C);
  a.c_rows = c_rows;
  Status s;
  {
    py::gil_scoped_release release;
    s = project(a, as_stream(stream));
  }
  if (!s.ok()) raise_status(s, "project");
}

int runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

// (current, high-water) bytes in use from the device's default memory pool,
// where the eigensolver's cudaMallocAsync workspace lives; reset clears the mark.
py::tuple mempool_used(int device, bool reset) {
  cudaMemPool_t pool;
  uint64_t current = 0, high = 0;
  cudaError_t err = cudaDeviceGetDefaultMemPool(&pool, device);
  if (err == cudaSuccess) err = cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &current);
  if (err == cudaSuccess) err = cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high);
  if (err == cudaSuccess && reset) {
    uint64_t zero = 0;
    err = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero);
  }
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("mempool_used(device=") + std::to_string(device) +
                             "): " + cudaGetErrorString(err) + " [CUDA]");
  }
  return py::make_tuple(current, high);
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() =
      "sphere_fast._C: CUDA eigensolver and fused projection (raw pointers and streams; "
      "use the wrappers in sphere_fast._cuda)";
  py::class_<EigResult>(mod, "EigResult", "Eigenpairs held in device memory until copied out.")
      .def_readonly("rank", &EigResult::rank)
      .def_property_readonly("method", [](const EigResult& r) { return r.dense ? "dense" : "block"; })
      .def_readonly("iterations", &EigResult::iterations)
      .def_readonly("tf32_iterations", &EigResult::tf32_iterations)
      .def_readonly("block_size", &EigResult::block_size)
      .def_readonly("residuals", &EigResult::residuals)
      .def("copy_out", &eig_copy_out, py::arg("values"), py::arg("vectors"), py::arg("ld"), py::arg("stream"),
           "Write values (float64, rank) and the vectors (row-major m x rank, row stride ld) to device pointers.");

  mod.def("eigensolve", &eigensolve, py::arg("G"), py::arg("m"), py::arg("ldg"), py::arg("dtype"), py::arg("trace"),
          py::arg("eta"), py::arg("method"), py::arg("init"), py::arg("k0"), py::arg("init_s0"), py::arg("init_s1"),
          py::arg("tol"), py::arg("max_iter"), py::arg("tf32"), py::arg("seed"), py::arg("oversample"),
          py::arg("min_guards"), py::arg("budget"), py::arg("max_block"), py::arg("iteration_cost"),
          py::arg("full_energy_slack"), py::arg("cold_block"), py::arg("stream"),
          "Top-r eigenpairs of the symmetric m x m matrix at G (see sphere_fast._cuda.top_eigenpairs).");
  // The solver's host rules: no device needed (tests compare them with sphere_fast.eigensolver's).
  mod.def("select_rank", &select_rank, py::arg("desc"), py::arg("trace"), py::arg("eta"), py::arg("complete"),
          py::arg("full_energy_slack"), "The rank rule on descending eigenvalues; 0 where the twin says None.");
  mod.def("iterations_to_converge", &iterations_to_converge, py::arg("theta"), py::arg("worst"), py::arg("previous"),
          py::arg("r"), py::arg("k"), py::arg("tol"),
          "Block iterations still needed (previous <= 0: none measured).");
  mod.def("project", &project_py, py::arg("out"), py::arg("out_dtype"), py::arg("os0"), py::arg("os1"), py::arg("W"),
          py::arg("ws0"), py::arg("ws1"), py::arg("B"), py::arg("b_dtype"), py::arg("ldb"), py::arg("U"),
          py::arg("ldu"), py::arg("n"), py::arg("d"), py::arg("r"), py::arg("alpha"), py::arg("T"), py::arg("u_hi"),
          py::arg("u_lo"), py::arg("ldh"), py::arg("t3"), py::arg("u3"), py::arg("ld3"), py::arg("C"), py::arg("c_rows"),
          py::arg("stream"),
          "out = [W +] B - alpha (B U) U^T (see sphere_fast._cuda.project / project_add_).");
  mod.def("runtime_version", &runtime_version, "CUDA runtime version the extension runs with (0 if unavailable).");
  mod.def("memory_pools_supported", &memory_pools_supported,
          "Whether the current device has memory pools (else the eigensolver uses cudaMalloc; "
          "SPHERE_FAST_NO_MEMPOOL=1 forces that fallback).");
  mod.def("mempool_used", &mempool_used, py::arg("device"), py::arg("reset") = false,
          "(current, peak) bytes used from the device's default cudaMallocAsync pool; reset clears the peak.");
}
