// Top-r eigenpairs of a symmetric PSD Gram with known trace: the CUDA twin of
// sphere_fast/eigensolver.py (same rank rule, block growth, guard vectors,
// residual test, warm start and cost-budget fallback to a dense solve). The
// auto rules (dense at once, or block within a budget) and the cost model come
// from Python in EigOptions, with the rank rule's constants; select_rank and
// iterations_to_converge are exported and tested against the twin's.
//
// Precision plan for an fp32 G (docs/design.md, "Precisions"):
//   * the bulk product Y = G X is the only O(m^2 k) step. While the block is
//     still being grown and converged it runs on TF32 tensor cores
//     (cublasGemmEx, CUBLAS_COMPUTE_32F_FAST_TF32); everything else is
//     float64: the block X and G X, the projected matrix X^T G X, the
//     CholeskyQR2 Grams X^T X, the Ritz rotation and the residuals
//     ||G u - theta u||.
//   * TF32 rounds each input to 11 significant bits, so a TF32 product
//     reports residuals above the fp32 tolerance even for the exact
//     eigenvectors: it can never certify the fp32 contract (the premise
//     tests/csrc/test_cuda_ext.py checks). Above that floor TF32 iterations
//     converge like fp32 ones, so the block runs on TF32 until its wanted
//     residuals drop below kTf32Switch * theta_1 or stop falling
//     (kTf32Stall), then on full-fp32 GEMMs (CUBLAS_COMPUTE_32F). A pair is
//     accepted only on an iteration whose G X was computed in fp32, so the
//     reported residuals are true fp32 residuals. Warm starts (already close
//     to the answer) run in fp32 from the first iteration.
// For an fp64 G every product is fp64 (cublasDgemm).
//
// Workspace: cudaMallocAsync / cudaFreeAsync on the caller's stream (the
// device's default memory pool). The block size grows during the solve, so a
// caller-sized buffer would have to be the worst case (k = m); stream-ordered
// allocation takes only what the block needs and is cheap after the first call.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <type_traits>
#include <vector>

#include "common.cuh"

namespace sphere_fast {

// TF32 iterations hand over to fp32 once every wanted residual is below this
// fraction of theta_1 (half a TF32 unit roundoff: still above the residual
// floor of TF32 products, so they are not asked for what they cannot reach),
// or once they stall (fall by less than kTf32Stall per iteration).
constexpr double kTf32Switch = 0.5 * 4.8828125e-4;
constexpr double kTf32Stall = 0.8;

// ---------------------------------------------------------------------------
// Host rules (declared in sphere_fast.h)

// sphere_fast.eigensolver.select_rank; returns 0 for "None".
int select_rank(const std::vector<double>& vals, double trace, double eta, bool complete, double full_energy_slack) {
  const int n = static_cast<int>(vals.size());
  double cum = 0.0;
  int count = 0, full = -1, positive = 0;
  for (int i = 0; i < n; ++i) {
    cum += vals[i];
    if (cum <= eta * trace) ++count;
    if (full < 0 && cum >= trace * (1.0 - full_energy_slack)) full = i;
    if (vals[i] > 0.0) ++positive;
  }
  if (full >= 0) return std::min(count + 1, full + 1);
  if (count == n) return complete ? std::max(1, positive) : 0;
  return count + 1;
}

// sphere_fast.eigensolver.iterations_to_converge: block iterations still needed
// for the worst wanted residual to fall from `worst` to `tol` (relative to
// theta_1). The rate per step is the larger of a power law fitted to the Ritz
// values over the q indices below r, extrapolated to k + 1, and the measured
// worst / previous (previous < 0: none; a step that did not shrink the
// residual is not read as a rate).
double iterations_to_converge(const std::vector<double>& theta, double worst, double previous, int r, int k,
                              double tol) {
  double rate = 0.0;
  const int q = std::min(k + 1 - r, r - 1);
  if (q >= 1 && theta[r - 1] > 0.0) {
    const double decay = std::log(theta[r - 1 - q] / theta[r - 1]) / std::log(static_cast<double>(r) / (r - q));
    rate = std::pow(static_cast<double>(r) / (k + 1), std::max(decay, 0.0));
  }
  if (previous > 0.0 && worst > 0.0 && worst < previous) rate = std::max(rate, worst / previous);
  if (rate >= 1.0) return std::numeric_limits<double>::infinity();
  if (rate <= 0.0 || worst <= tol) return 1.0;
  return std::max(1.0, std::log(tol / worst) / std::log(rate));
}


namespace {

using detail::blocks_for;
using detail::DeviceBuffer;

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------
// Kernels

template <typename T>
__global__ void _nonfinite_kernel(const T* __restrict__ a, int64_t rows, int64_t cols, int64_t s0, int64_t s1,
                                  int* __restrict__ flag) {
  const int64_t total = rows * cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / cols, j = e % cols;
    if (!isfinite(static_cast<double>(a[i * s0 + j * s1]))) {
      *flag = 1;
      return;
    }
  }
}

// dst (column-major, leading dimension ldd, fp64) <- src (strided, T).
template <typename T>
__global__ void _load_columns_kernel(const T* __restrict__ src, int64_t rows, int64_t cols, int64_t s0, int64_t s1,
                                     double* __restrict__ dst, int64_t ldd) {
  const int64_t total = rows * cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e % rows, j = e / rows;
    dst[j * ldd + i] = static_cast<double>(src[i * s0 + j * s1]);
  }
}

__device__ __forceinline__ uint64_t _splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Standard normal samples from a counter-based hash (Box-Muller on two
// 53-bit uniforms): reproducible for a given seed and stream position.
__global__ void _random_normal_kernel(double* __restrict__ dst, int64_t count, uint64_t seed, uint64_t offset) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t key = _splitmix64(seed ^ _splitmix64(offset + static_cast<uint64_t>(e)));
    const uint64_t h1 = _splitmix64(key), h2 = _splitmix64(key ^ 0xD1B54A32D192ED03ull);
    const double u1 = (static_cast<double>(h1 >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
    const double u2 = static_cast<double>(h2 >> 11) * 0x1.0p-53;          // [0, 1)
    dst[e] = sqrt(-2.0 * log(u1)) * cospi(2.0 * u2);
  }
}

template <typename Src, typename Dst>
__global__ void _convert_kernel(const Src* __restrict__ src, Dst* __restrict__ dst, int64_t count) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[e] = static_cast<Dst>(src[e]);
  }
}

// H <- (H + H^T) / 2 (k x k, column-major).
__global__ void _symmetrize_kernel(double* __restrict__ h, int k) {
  const int64_t total = static_cast<int64_t>(k) * k;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e % k, j = e / k;
    if (i < j) {
      const double v = 0.5 * (h[j * k + i] + h[i * k + j]);
      h[j * k + i] = v;
      h[i * k + j] = v;
    }
  }
}

// syevd's ascending (w, V) -> descending (theta, S).
__global__ void _descending_kernel(const double* __restrict__ w, const double* __restrict__ v, int k,
                                   double* __restrict__ theta, double* __restrict__ s) {
  const int64_t total = static_cast<int64_t>(k) * k;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e % k, j = e / k;
    s[j * k + i] = v[(k - 1 - j) * static_cast<int64_t>(k) + i];
    if (i == 0) theta[j] = w[k - 1 - j];
  }
}

// The sum of every thread's `value` over a block of kThreads threads, returned to all of them.
__device__ double block_sum(double value) {
  __shared__ double partial[kThreads];
  partial[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  return partial[0];
}

// One block per column j: res[j] = ||Y_j - theta_j X_j|| (fp64, m x k column-major).
__global__ void _residual_kernel(const double* __restrict__ x, const double* __restrict__ y,
                                 const double* __restrict__ theta, int64_t m, double* __restrict__ res) {
  const int64_t j = blockIdx.x;
  const double t = theta[j];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    const double diff = y[j * m + i] - t * x[j * m + i];
    acc += diff * diff;
  }
  const double total = block_sum(acc);
  if (threadIdx.x == 0) res[j] = sqrt(total);
}

// One block per column j: norms[j] = ||X_j|| (fp64, m rows, column-major).
__global__ void _column_norms_kernel(const double* __restrict__ x, int64_t m, double* __restrict__ norms) {
  const int64_t j = blockIdx.x;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) acc += x[j * m + i] * x[j * m + i];
  const double total = block_sum(acc);
  if (threadIdx.x == 0) norms[j] = sqrt(total);
}

// One block per column: scale column j of x (m x k) to unit norm (zero stays zero).
__global__ void _normalize_columns_kernel(double* __restrict__ x, int64_t m) {
  const int64_t j = blockIdx.x;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) acc += x[j * m + i] * x[j * m + i];
  const double norm = sqrt(block_sum(acc));
  if (norm > 0.0 && isfinite(norm)) {
    const double inv = 1.0 / norm;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) x[j * m + i] *= inv;
  }
}

// flag <- 1 if the Cholesky factor's diagonal is not finite and positive.
__global__ void _check_cholesky_kernel(const double* __restrict__ l, int k, int* __restrict__ flag) {
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < k; j += gridDim.x * blockDim.x) {
    const double v = l[static_cast<int64_t>(j) * k + j];
    if (!(isfinite(v) && v > 0.0)) *flag = 1;
  }
}

// dst[:, j] <- src[:, total - 1 - j] for j < r (column-major, m rows).
template <typename T>
__global__ void _reverse_columns_kernel(const T* __restrict__ src, int64_t m, int64_t total, int64_t r,
                                        T* __restrict__ dst) {
  const int64_t count = m * r;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e % m, j = e / m;
    dst[e] = src[(total - 1 - j) * m + i];
  }
}

// Row-major dst (row stride ld) <- column-major src (m x r).
template <typename T>
__global__ void _to_row_major_kernel(const T* __restrict__ src, int64_t m, int64_t r, T* __restrict__ dst,
                                     int64_t ld) {
  const int64_t count = m * r;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e % r, i = e / r;
    dst[i * ld + j] = src[j * m + i];
  }
}

// ---------------------------------------------------------------------------
// Host helpers

template <typename T>
constexpr int dtype_code() {
  return std::is_same<T, double>::value ? kFloat64 : kFloat32;
}

template <typename T>
constexpr cudaDataType_t cuda_type() {
  return std::is_same<T, double>::value ? CUDA_R_64F : CUDA_R_32F;
}

Status read_flag(const DeviceBuffer& flag, cudaStream_t stream, int* out) {
  SF_CUDA(cudaMemcpyAsync(out, flag.get(), sizeof(int), cudaMemcpyDeviceToHost, stream));
  SF_CUDA(cudaStreamSynchronize(stream));
  return Status::Ok();
}

template <typename T>
Status any_nonfinite(const T* a, int64_t rows, int64_t cols, int64_t s0, int64_t s1, cudaStream_t stream,
                     bool* out) {
  DeviceBuffer flag;
  SF_RETURN_IF_ERROR(flag.allocate(sizeof(int), stream));
  SF_CUDA(cudaMemsetAsync(flag.get(), 0, sizeof(int), stream));
  _nonfinite_kernel<T><<<blocks_for(rows * cols, kThreads, 4096), kThreads, 0, stream>>>(a, rows, cols, s0, s1,
                                                                                          flag.as<int>());
  SF_RETURN_IF_ERROR(detail::launch_status("_nonfinite_kernel"));
  int host = 0;
  SF_RETURN_IF_ERROR(read_flag(flag, stream, &host));
  *out = host != 0;
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Dense: cusolverDnXsyevd of the whole matrix in the working precision.

template <typename T>
Status dense_solve(const T* G, int m, int64_t ldg, double trace, double eta, double full_energy_slack,
                   cudaStream_t stream, std::unique_ptr<EigResult>* result) {
  cusolverDnHandle_t solver;
  SF_RETURN_IF_ERROR(detail::solver_handle(stream, &solver));
  const int64_t mm = m;
  DeviceBuffer a, w, info;
  SF_RETURN_IF_ERROR(a.allocate(sizeof(T) * mm * mm, stream));
  SF_RETURN_IF_ERROR(w.allocate(sizeof(T) * mm, stream));
  SF_RETURN_IF_ERROR(info.allocate(sizeof(int), stream));
  SF_CUDA(cudaMemcpy2DAsync(a.get(), sizeof(T) * mm, G, sizeof(T) * ldg, sizeof(T) * mm, mm,
                            cudaMemcpyDeviceToDevice, stream));

  cusolverDnParams_t params;
  SF_CUSOLVER(cusolverDnCreateParams(&params));
  struct ParamsGuard {
    cusolverDnParams_t p;
    ~ParamsGuard() { cusolverDnDestroyParams(p); }
  } guard{params};
  size_t dev_bytes = 0, host_bytes = 0;
  constexpr cudaDataType_t type = cuda_type<T>();
  SF_CUSOLVER(cusolverDnXsyevd_bufferSize(solver, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, mm, type,
                                          a.get(), mm, type, w.get(), type, &dev_bytes, &host_bytes));
  DeviceBuffer work;
  SF_RETURN_IF_ERROR(work.allocate(dev_bytes, stream));
  std::vector<char> host_work(host_bytes > 0 ? host_bytes : 1);
  SF_CUSOLVER(cusolverDnXsyevd(solver, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, mm, type, a.get(),
                               mm, type, w.get(), type, work.get(), dev_bytes, host_work.data(), host_bytes,
                               info.as<int>()));
  std::vector<T> w_host(m);
  int info_host = 0;
  SF_CUDA(cudaMemcpyAsync(w_host.data(), w.get(), sizeof(T) * mm, cudaMemcpyDeviceToHost, stream));
  SF_CUDA(cudaMemcpyAsync(&info_host, info.get(), sizeof(int), cudaMemcpyDeviceToHost, stream));
  SF_CUDA(cudaStreamSynchronize(stream));
  if (info_host != 0) {
    return Status::Error(StatusCode::kCusolverError,
                         "cusolverDnXsyevd on the " + std::to_string(m) + " x " + std::to_string(m) +
                             " matrix G failed: info = " + std::to_string(info_host));
  }
  std::vector<double> desc(m);
  for (int i = 0; i < m; ++i) desc[i] = static_cast<double>(w_host[m - 1 - i]);
  const int r = select_rank(desc, trace, eta, /*complete=*/true, full_energy_slack);

  auto out = std::make_unique<EigResult>();
  out->m = m;
  out->rank = r;
  out->dtype = dtype_code<T>();
  out->dense = true;
  out->iterations = 0;
  out->block_size = m;
  out->values.assign(desc.begin(), desc.begin() + r);
  out->stream = stream;
  DeviceBuffer values, vectors;
  SF_RETURN_IF_ERROR(values.allocate(sizeof(double) * r, stream));
  SF_RETURN_IF_ERROR(vectors.allocate(sizeof(T) * mm * r, stream));
  SF_CUDA(cudaMemcpyAsync(values.get(), out->values.data(), sizeof(double) * r, cudaMemcpyHostToDevice, stream));
  _reverse_columns_kernel<T><<<blocks_for(mm * r, kThreads), kThreads, 0, stream>>>(a.as<T>(), mm, mm, r,
                                                                                     vectors.as<T>());
  SF_RETURN_IF_ERROR(detail::launch_status("_reverse_columns_kernel"));
  // The host vector above is the source of a pending copy: wait before it can go.
  SF_CUDA(cudaStreamSynchronize(stream));
  out->d_values = values.as<double>();
  values.release();
  out->d_vectors = vectors.release();
  *result = std::move(out);
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Block subspace iteration with Rayleigh-Ritz.

template <typename T>
class BlockSolver {
 public:
  BlockSolver(const T* G, int m, int64_t ldg, double trace, double eta, const EigOptions& opt, cudaStream_t stream)
      : G_(G), m_(m), ldg_(ldg), trace_(trace), eta_(eta), opt_(opt), max_block_(opt.max_block), stream_(stream) {}

  // *result stays empty when the cost budget (opt.budget; <= 0: none) runs out
  // or the block would outgrow opt.max_block columns (<= 0: no cap).
  Status run(const T* init, int k0, int64_t init_s0, int64_t init_s1, std::unique_ptr<EigResult>* result) {
    const double budget = opt_.budget;
    SF_RETURN_IF_ERROR(detail::blas_handle(stream_, &blas_));
    SF_RETURN_IF_ERROR(detail::solver_handle(stream_, &solver_));
    SF_RETURN_IF_ERROR(flag_.allocate(sizeof(int), stream_));
    SF_RETURN_IF_ERROR(info_.allocate(sizeof(int), stream_));
    const int64_t m = m_;
    // The block carries p guard vectors past the previous (or expected) rank;
    // pairs are accepted once min_guards remain past the current r.
    const int p = opt_.oversample;
    const int min_guards = opt_.min_guards;
    bool tf32 = opt_.tf32 && std::is_same<T, float>::value;
    double spent = 0.0;
    if (init != nullptr) {
      SF_RETURN_IF_ERROR(warm_start(init, k0, init_s0, init_s1, p));
      tf32 = false;  // a warm start is near the answer: TF32 steps would be discarded
      spent = iteration_cost(k0);  // the set-up: G V, its residual directions
    } else {
      k_ = std::min(m_, opt_.cold_block);
      SF_RETURN_IF_ERROR(reserve(k_, &x_));
      SF_RETURN_IF_ERROR(random_columns(x_.as<double>(), m * k_));
    }
    SF_RETURN_IF_ERROR(orthonormalize(&x_, k_));

    double previous = -1.0;  // worst relative residual of the leading r pairs, last fp32 iteration
    int previous_r = 0;      // r at that iteration
    double previous_tf32 = std::numeric_limits<double>::infinity();
    double last_energy = -1.0;  // sum of the Ritz values, last iteration (while r is unknown); < 0: none
    int steps_at_k = 0;
    std::vector<double> theta, res;
    for (int iteration = 1; iteration <= opt_.max_iter; ++iteration) {
      const int k = k_;
      spent += iteration_cost(k);
      if (budget > 0.0 && spent > budget) return Status::Ok();  // let the caller go dense
      const bool this_tf32 = tf32;
      if (this_tf32) ++tf32_iterations_;
      SF_RETURN_IF_ERROR(rayleigh_ritz(this_tf32, &theta, &res));
      const int r = select_rank(theta, trace_, eta_, /*complete=*/k == m_, opt_.full_energy_slack);
      if (r > 0 && (r + min_guards <= k || k == m_)) {
        double worst = 0.0;
        for (int j = 0; j < r; ++j) worst = std::max(worst, res[j] / theta[0]);
        if (!this_tf32) {
          if (worst <= opt_.tol) return accept(r, iteration, theta, res, result);
          if (budget > 0.0) {
            // Give up as soon as the convergence rate says the block cannot
            // reach tol within the budget (flat spectra: dense is cheaper).
            const double last = previous_r == r ? previous : -1.0;
            const double needed = iterations_to_converge(theta, worst, last, r, k, opt_.tol);
            if (spent + needed * iteration_cost(k) > budget) return Status::Ok();
          }
          previous = worst;
          previous_r = r;
        } else {
          // TF32 residuals bottom out near the TF32 rounding of G x: hand over
          // to fp32 there (the rate test above then sees fp32 rates only).
          if (worst <= kTf32Switch || worst > kTf32Stall * previous_tf32) tf32 = false;
          previous_tf32 = worst;
        }
        SF_RETURN_IF_ERROR(orthonormalize(&y_, k));  // one subspace-iteration step
        std::swap(x_, y_);
        continue;
      }
      previous = -1.0;
      previous_tf32 = std::numeric_limits<double>::infinity();
      // Too few guard vectors, or too little energy in the block. Grow it once
      // its Ritz values have settled; until then a subspace step is cheaper.
      double energy = 0.0;
      for (double t : theta) energy += t;
      steps_at_k = last_energy < 0.0 ? 0 : steps_at_k + 1;
      const bool settled = r > 0 || steps_at_k >= 3 || (last_energy >= 0.0 && energy <= last_energy * 1.01);
      last_energy = energy;
      if (!settled) {
        SF_RETURN_IF_ERROR(orthonormalize(&y_, k));
        std::swap(x_, y_);
        continue;
      }
      const int k_new = std::min(m_, std::max(2 * k, r + p));
      if (max_block_ > 0 && k_new > max_block_) return Status::Ok();  // let the caller go dense
      SF_RETURN_IF_ERROR(grow(k, k_new));
      SF_RETURN_IF_ERROR(orthonormalize(&x_, k_new));
      k_ = k_new;
      last_energy = -1.0;
    }
    std::ostringstream msg;
    msg << "block eigensolver did not converge in " << opt_.max_iter << " iterations (m=" << m_ << ", block=" << k_
        << ", tol=" << opt_.tol << ")";
    return Status::Error(StatusCode::kNotConverged, msg.str());
  }

 private:
  // The cost model of sphere_fast.eigensolver.iteration_cost, coefficients from the caller.
  double iteration_cost(int k) const {
    const double m = m_, kk = k;
    return opt_.iteration_cost[0] * m * m * kk + opt_.iteration_cost[1] * m * kk * kk +
           opt_.iteration_cost[2] * kk * kk * kk;
  }

  // An m x k fp64 block (fresh contents when it has to grow).
  Status reserve(int k, DeviceBuffer* buf) { return buf->ensure(sizeof(double) * m_ * static_cast<int64_t>(k), stream_); }

  // Warm start: the previous basis V, plus the directions its residual
  // R = G V - V (V^T G V) points to (where the change moved the subspace): the
  // min(p, k0) columns of R with the largest norms, topped up with random
  // guard vectors; at most m columns in all. Sets x_ and k_ (not yet
  // orthonormal as a whole).
  Status warm_start(const T* init, int k0, int64_t init_s0, int64_t init_s1, int p) {
    const int64_t m = m_;
    SF_RETURN_IF_ERROR(reserve(k0, &x_));
    _load_columns_kernel<T><<<blocks_for(m * k0, kThreads), kThreads, 0, stream_>>>(init, m, k0, init_s0, init_s1,
                                                                                    x_.as<double>(), m);
    SF_RETURN_IF_ERROR(detail::launch_status("_load_columns_kernel"));
    SF_RETURN_IF_ERROR(orthonormalize(&x_, k0));
    k_ = k0;
    SF_RETURN_IF_ERROR(reserve(k0, &y_));
    SF_RETURN_IF_ERROR(product(/*tf32=*/false, k0));  // y_ = G V
    SF_RETURN_IF_ERROR(c_.ensure(sizeof(double) * k0 * static_cast<int64_t>(k0), stream_));
    SF_RETURN_IF_ERROR(res_.ensure(sizeof(double) * k0, stream_));
    const double one = 1.0, zero = 0.0, minus = -1.0;
    SF_CUBLAS(cublasDgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, k0, k0, m_, &one, x_.as<double>(), m_, y_.as<double>(), m_,
                          &zero, c_.as<double>(), k0));
    SF_CUBLAS(cublasDgemm(blas_, CUBLAS_OP_N, CUBLAS_OP_N, m_, k0, k0, &minus, x_.as<double>(), m_, c_.as<double>(), k0,
                          &one, y_.as<double>(), m_));  // y_ = R
    _column_norms_kernel<<<k0, kThreads, 0, stream_>>>(y_.as<double>(), m, res_.as<double>());
    SF_RETURN_IF_ERROR(detail::launch_status("_column_norms_kernel"));
    std::vector<double> norms(k0);
    SF_CUDA(cudaMemcpyAsync(norms.data(), res_.get(), sizeof(double) * k0, cudaMemcpyDeviceToHost, stream_));
    SF_CUDA(cudaStreamSynchronize(stream_));
    std::vector<int> order(k0);
    for (int j = 0; j < k0; ++j) order[j] = j;
    const int keep = std::min(p, k0);
    std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                      [&](int a, int b) { return norms[a] > norms[b]; });
    const int topup = std::max(0, std::min(p, m_ - k0) - keep);
    const int total = std::min(m_, k0 + keep + topup);
    DeviceBuffer& next = x_next_;
    SF_RETURN_IF_ERROR(reserve(total, &next));
    SF_CUDA(cudaMemcpyAsync(next.get(), x_.get(), sizeof(double) * m * k0, cudaMemcpyDeviceToDevice, stream_));
    int filled = k0;
    for (int j = 0; j < keep && filled < total; ++j, ++filled) {
      SF_CUDA(cudaMemcpyAsync(next.as<double>() + m * filled, y_.as<double>() + m * order[j], sizeof(double) * m,
                              cudaMemcpyDeviceToDevice, stream_));
    }
    SF_RETURN_IF_ERROR(random_columns(next.as<double>() + m * filled, m * (total - filled)));
    x_.swap(next);
    k_ = total;
    return Status::Ok();
  }

  Status random_columns(double* dst, int64_t count) {
    if (count <= 0) return Status::Ok();
    _random_normal_kernel<<<blocks_for(count, kThreads), kThreads, 0, stream_>>>(dst, count, opt_.seed, rng_offset_);
    rng_offset_ += static_cast<uint64_t>(count);
    return detail::launch_status("_random_normal_kernel");
  }

  // y_ <- G x_ (fp64 storage), then the Ritz rotation of x_ and y_, theta
  // (descending) and the residual norms, copied to the host.
  Status rayleigh_ritz(bool tf32, std::vector<double>* theta, std::vector<double>* res) {
    const int k = k_;
    const int64_t m = m_;
    const int64_t kk = static_cast<int64_t>(k) * k;
    SF_RETURN_IF_ERROR(reserve(k, &y_));
    SF_RETURN_IF_ERROR(product(tf32, k));
    SF_RETURN_IF_ERROR(h_.ensure(sizeof(double) * kk, stream_));
    SF_RETURN_IF_ERROR(s_.ensure(sizeof(double) * kk, stream_));
    SF_RETURN_IF_ERROR(w_.ensure(sizeof(double) * k, stream_));
    SF_RETURN_IF_ERROR(theta_.ensure(sizeof(double) * k, stream_));
    SF_RETURN_IF_ERROR(res_.ensure(sizeof(double) * k, stream_));
    const double one = 1.0, zero = 0.0;
    SF_CUBLAS(cublasDgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, k, k, m_, &one, x_.as<double>(), m_, y_.as<double>(), m_,
                          &zero, h_.as<double>(), k));
    _symmetrize_kernel<<<blocks_for(kk, kThreads), kThreads, 0, stream_>>>(h_.as<double>(), k);
    SF_RETURN_IF_ERROR(detail::launch_status("_symmetrize_kernel"));
    int lwork = 0;
    SF_CUSOLVER(cusolverDnDsyevd_bufferSize(solver_, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, k,
                                            h_.as<double>(), k, w_.as<double>(), &lwork));
    SF_RETURN_IF_ERROR(work_.ensure(sizeof(double) * std::max(lwork, 1), stream_));
    SF_CUSOLVER(cusolverDnDsyevd(solver_, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, k, h_.as<double>(), k,
                                 w_.as<double>(), work_.as<double>(), lwork, info_.as<int>()));
    _descending_kernel<<<blocks_for(kk, kThreads), kThreads, 0, stream_>>>(w_.as<double>(), h_.as<double>(), k,
                                                                          theta_.as<double>(), s_.as<double>());
    SF_RETURN_IF_ERROR(detail::launch_status("_descending_kernel"));
    SF_RETURN_IF_ERROR(reserve(k, &x_next_));
    SF_RETURN_IF_ERROR(reserve(k, &y_next_));
    SF_CUBLAS(cublasDgemm(blas_, CUBLAS_OP_N, CUBLAS_OP_N, m_, k, k, &one, x_.as<double>(), m_, s_.as<double>(), k,
                          &zero, x_next_.as<double>(), m_));
    SF_CUBLAS(cublasDgemm(blas_, CUBLAS_OP_N, CUBLAS_OP_N, m_, k, k, &one, y_.as<double>(), m_, s_.as<double>(), k,
                          &zero, y_next_.as<double>(), m_));
    x_.swap(x_next_);
    y_.swap(y_next_);
    _residual_kernel<<<k, kThreads, 0, stream_>>>(x_.as<double>(), y_.as<double>(), theta_.as<double>(), m,
                                                  res_.as<double>());
    SF_RETURN_IF_ERROR(detail::launch_status("_residual_kernel"));
    theta->assign(k, 0.0);
    res->assign(k, 0.0);
    int info_host = 0;
    SF_CUDA(cudaMemcpyAsync(theta->data(), theta_.get(), sizeof(double) * k, cudaMemcpyDeviceToHost, stream_));
    SF_CUDA(cudaMemcpyAsync(res->data(), res_.get(), sizeof(double) * k, cudaMemcpyDeviceToHost, stream_));
    SF_CUDA(cudaMemcpyAsync(&info_host, info_.get(), sizeof(int), cudaMemcpyDeviceToHost, stream_));
    SF_CUDA(cudaStreamSynchronize(stream_));
    if (info_host != 0) {
      return Status::Error(StatusCode::kCusolverError, "cusolverDnDsyevd on the " + std::to_string(k) + " x " +
                                                           std::to_string(k) +
                                                           " projected matrix failed: info = " + std::to_string(info_host));
    }
    for (int j = 0; j < k; ++j) {
      if (!std::isfinite((*theta)[j]) || !std::isfinite((*res)[j])) {
        return Status::Error(StatusCode::kNonFinite,
                             "the block eigensolver produced NaN or Inf Ritz values (is G symmetric and finite?)");
      }
    }
    return Status::Ok();
  }

  // y_ (fp64) <- G x_.
  Status product(bool tf32, int k) {
    if constexpr (std::is_same<T, double>::value) {
      const double one = 1.0, zero = 0.0;
      SF_CUBLAS(cublasDgemm(blas_, CUBLAS_OP_N, CUBLAS_OP_N, m_, k, m_, &one, G_, static_cast<int>(ldg_),
                            x_.as<double>(), m_, &zero, y_.as<double>(), m_));
    } else {
      const int64_t count = static_cast<int64_t>(m_) * k;
      DeviceBuffer& xw = x32_;
      DeviceBuffer& yw = y32_;
      SF_RETURN_IF_ERROR(xw.ensure(sizeof(float) * count, stream_));
      SF_RETURN_IF_ERROR(yw.ensure(sizeof(float) * count, stream_));
      _convert_kernel<double, float><<<blocks_for(count, kThreads), kThreads, 0, stream_>>>(x_.as<double>(),
                                                                                           xw.as<float>(), count);
      SF_RETURN_IF_ERROR(detail::launch_status("_convert_kernel"));
      const float one = 1.0f, zero = 0.0f;
      SF_CUBLAS(cublasGemmEx(blas_, CUBLAS_OP_N, CUBLAS_OP_N, m_, k, m_, &one, G_, CUDA_R_32F, static_cast<int>(ldg_),
                             xw.get(), CUDA_R_32F, m_, &zero, yw.get(), CUDA_R_32F, m_,
                             tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      _convert_kernel<float, double><<<blocks_for(count, kThreads), kThreads, 0, stream_>>>(yw.as<float>(),
                                                                                           y_.as<double>(), count);
      SF_RETURN_IF_ERROR(detail::launch_status("_convert_kernel"));
    }
    return Status::Ok();
  }

  // x_ <- [y_, random columns made orthogonal to x_] (k -> k_new columns).
  Status grow(int k, int k_new) {
    const int64_t m = m_;
    const int e = k_new - k;
    DeviceBuffer& next = x_next_;
    SF_RETURN_IF_ERROR(reserve(k_new, &next));
    SF_RETURN_IF_ERROR(c_.ensure(sizeof(double) * k * static_cast<int64_t>(e), stream_));
    SF_CUDA(cudaMemcpyAsync(next.get(), y_.get(), sizeof(double) * m * k, cudaMemcpyDeviceToDevice, stream_));
    double* extra = next.as<double>() + m * k;
    SF_RETURN_IF_ERROR(random_columns(extra, m * e));
    const double one = 1.0, zero = 0.0, minus = -1.0;
    SF_CUBLAS(cublasDgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, k, e, m_, &one, x_.as<double>(), m_, extra, m_, &zero,
                          c_.as<double>(), k));
    SF_CUBLAS(cublasDgemm(blas_, CUBLAS_OP_N, CUBLAS_OP_N, m_, e, k, &minus, x_.as<double>(), m_, c_.as<double>(), k,
                          &one, extra, m_));
    x_.swap(next);
    return Status::Ok();
  }

  // Orthonormal basis of q's k columns in place: column scaling, then
  // CholeskyQR2 (fp64 Gram, potrf, trsm); Householder QR when the block is
  // numerically rank-deficient.
  Status orthonormalize(DeviceBuffer* q, int k) {
    const int64_t m = m_;
    DeviceBuffer& original = original_;
    DeviceBuffer& h = h_;
    SF_RETURN_IF_ERROR(reserve(k, &original));
    SF_CUDA(cudaMemcpyAsync(original.get(), q->get(), sizeof(double) * m * k, cudaMemcpyDeviceToDevice, stream_));
    SF_RETURN_IF_ERROR(h.ensure(sizeof(double) * k * static_cast<int64_t>(k), stream_));
    _normalize_columns_kernel<<<k, kThreads, 0, stream_>>>(q->as<double>(), m);
    SF_RETURN_IF_ERROR(detail::launch_status("_normalize_columns_kernel"));
    int lwork = 0;
    SF_CUSOLVER(cusolverDnDpotrf_bufferSize(solver_, CUBLAS_FILL_MODE_LOWER, k, h.as<double>(), k, &lwork));
    DeviceBuffer& work = work_;
    SF_RETURN_IF_ERROR(work.ensure(sizeof(double) * std::max(lwork, 1), stream_));
    const double one = 1.0, zero = 0.0;
    for (int pass = 0; pass < 2; ++pass) {
      SF_CUBLAS(cublasDsyrk(blas_, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_T, k, m_, &one, q->as<double>(), m_, &zero,
                            h.as<double>(), k));
      SF_CUSOLVER(cusolverDnDpotrf(solver_, CUBLAS_FILL_MODE_LOWER, k, h.as<double>(), k, work.as<double>(), lwork,
                                   info_.as<int>()));
      SF_CUDA(cudaMemsetAsync(flag_.get(), 0, sizeof(int), stream_));
      _check_cholesky_kernel<<<blocks_for(k, kThreads), kThreads, 0, stream_>>>(h.as<double>(), k, flag_.as<int>());
      SF_RETURN_IF_ERROR(detail::launch_status("_check_cholesky_kernel"));
      int host[2] = {0, 0};
      SF_CUDA(cudaMemcpyAsync(&host[0], info_.get(), sizeof(int), cudaMemcpyDeviceToHost, stream_));
      SF_CUDA(cudaMemcpyAsync(&host[1], flag_.get(), sizeof(int), cudaMemcpyDeviceToHost, stream_));
      SF_CUDA(cudaStreamSynchronize(stream_));
      if (host[0] != 0 || host[1] != 0) return householder(&original, k, q);
      SF_CUBLAS(cublasDtrsm(blas_, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_T, CUBLAS_DIAG_NON_UNIT, m_, k,
                            &one, h.as<double>(), k, q->as<double>(), m_));
    }
    return Status::Ok();
  }

  Status householder(DeviceBuffer* a, int k, DeviceBuffer* q) {
    DeviceBuffer tau;
    SF_RETURN_IF_ERROR(tau.allocate(sizeof(double) * k, stream_));
    int lwork_qr = 0, lwork_q = 0;
    SF_CUSOLVER(cusolverDnDgeqrf_bufferSize(solver_, m_, k, a->as<double>(), m_, &lwork_qr));
    SF_CUSOLVER(cusolverDnDorgqr_bufferSize(solver_, m_, k, k, a->as<double>(), m_, tau.as<double>(), &lwork_q));
    DeviceBuffer& work = work_;
    const int lwork = std::max(1, std::max(lwork_qr, lwork_q));
    SF_RETURN_IF_ERROR(work.ensure(sizeof(double) * lwork, stream_));
    SF_CUSOLVER(cusolverDnDgeqrf(solver_, m_, k, a->as<double>(), m_, tau.as<double>(), work.as<double>(), lwork,
                                 info_.as<int>()));
    int info_qr = 0;
    SF_CUDA(cudaMemcpyAsync(&info_qr, info_.get(), sizeof(int), cudaMemcpyDeviceToHost, stream_));
    SF_CUSOLVER(cusolverDnDorgqr(solver_, m_, k, k, a->as<double>(), m_, tau.as<double>(), work.as<double>(), lwork,
                                 info_.as<int>()));
    int info_q = 0;
    SF_CUDA(cudaMemcpyAsync(&info_q, info_.get(), sizeof(int), cudaMemcpyDeviceToHost, stream_));
    SF_CUDA(cudaStreamSynchronize(stream_));
    if (info_qr != 0 || info_q != 0) {
      return Status::Error(StatusCode::kCusolverError, "Householder QR of the " + std::to_string(m_) + " x " +
                                                           std::to_string(k) + " block failed: info = " +
                                                           std::to_string(info_qr != 0 ? info_qr : info_q));
    }
    q->swap(*a);
    return Status::Ok();
  }

  Status accept(int r, int iteration, const std::vector<double>& theta, const std::vector<double>& res,
                std::unique_ptr<EigResult>* result) {
    const int64_t count = static_cast<int64_t>(m_) * r;
    auto out = std::make_unique<EigResult>();
    out->m = m_;
    out->rank = r;
    out->dtype = dtype_code<T>();
    out->dense = false;
    out->iterations = iteration;
    out->tf32_iterations = tf32_iterations_;
    out->block_size = k_;
    out->values.assign(theta.begin(), theta.begin() + r);
    out->residuals.assign(res.begin(), res.begin() + r);
    out->stream = stream_;
    DeviceBuffer values, vectors;
    SF_RETURN_IF_ERROR(values.allocate(sizeof(double) * r, stream_));
    SF_RETURN_IF_ERROR(vectors.allocate(sizeof(T) * count, stream_));
    SF_CUDA(cudaMemcpyAsync(values.get(), out->values.data(), sizeof(double) * r, cudaMemcpyHostToDevice, stream_));
    _convert_kernel<double, T><<<blocks_for(count, kThreads), kThreads, 0, stream_>>>(x_.as<double>(), vectors.as<T>(),
                                                                                      count);
    SF_RETURN_IF_ERROR(detail::launch_status("_convert_kernel"));
    SF_CUDA(cudaStreamSynchronize(stream_));
    out->d_values = values.as<double>();
    values.release();
    out->d_vectors = vectors.release();
    *result = std::move(out);
    return Status::Ok();
  }

  const T* G_;
  int m_;
  int64_t ldg_;
  double trace_, eta_;
  EigOptions opt_;
  int max_block_;
  cudaStream_t stream_;
  cublasHandle_t blas_ = nullptr;
  cusolverDnHandle_t solver_ = nullptr;
  int k_ = 0;
  int tf32_iterations_ = 0;
  uint64_t rng_offset_ = 0;
  // The block X and G X (fp64), and scratch kept across iterations: the block
  // only grows, so after the first iterations nothing is allocated.
  DeviceBuffer x_, y_, x_next_, y_next_, original_, x32_, y32_;
  DeviceBuffer h_, s_, w_, theta_, res_, c_, work_, flag_, info_;
};

template <typename T>
Status solve(const T* G, int m, int64_t ldg, double trace, double eta, const T* init, int k0, int64_t init_s0,
             int64_t init_s1, const EigOptions& opt, cudaStream_t stream, std::unique_ptr<EigResult>* result) {
  bool bad = false;
  SF_RETURN_IF_ERROR(any_nonfinite<T>(G, m, m, ldg, 1, stream, &bad));
  if (bad) return Status::Error(StatusCode::kNonFinite, "G contains NaN or Inf");
  if (init != nullptr) {
    SF_RETURN_IF_ERROR(any_nonfinite<T>(init, m, k0, init_s0, init_s1, stream, &bad));
    if (bad) return Status::Error(StatusCode::kNonFinite, "init contains NaN or Inf");
  }
  if (opt.method == EigMethod::kDense) {
    return dense_solve<T>(G, m, ldg, trace, eta, opt.full_energy_slack, stream, result);
  }
  {
    BlockSolver<T> solver(G, m, ldg, trace, eta, opt, stream);
    SF_RETURN_IF_ERROR(solver.run(init, k0, init_s0, init_s1, result));
  }
  if (*result) return Status::Ok();
  return dense_solve<T>(G, m, ldg, trace, eta, opt.full_energy_slack, stream, result);
}

}  // namespace

// ---------------------------------------------------------------------------
// Public API

EigResult::~EigResult() {
  if (d_values != nullptr) detail::device_free(d_values, stream);
  if (d_vectors != nullptr) detail::device_free(d_vectors, stream);
}

Status EigResult::copy_out(double* values_out, void* vectors_out, int64_t ld, cudaStream_t out_stream) const {
  detail::clear_stale_error();
  if (rank > 0 && (values_out == nullptr || vectors_out == nullptr)) {
    return Status::Error(StatusCode::kInvalidArgument, "copy_out: values and vectors must be device pointers, got null");
  }
  if (ld < rank) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "copy_out: vectors row stride must be >= rank " + std::to_string(rank) + ", got " +
                             std::to_string(ld));
  }
  if (rank == 0) return Status::Ok();
  SF_CUDA(cudaMemcpyAsync(values_out, d_values, sizeof(double) * rank, cudaMemcpyDeviceToDevice, out_stream));
  const int64_t count = static_cast<int64_t>(m) * rank;
  if (dtype == kFloat64) {
    _to_row_major_kernel<double><<<blocks_for(count, kThreads), kThreads, 0, out_stream>>>(
        static_cast<const double*>(d_vectors), m, rank, static_cast<double*>(vectors_out), ld);
  } else {
    _to_row_major_kernel<float><<<blocks_for(count, kThreads), kThreads, 0, out_stream>>>(
        static_cast<const float*>(d_vectors), m, rank, static_cast<float*>(vectors_out), ld);
  }
  SF_RETURN_IF_ERROR(detail::launch_status("_to_row_major_kernel"));
  if (out_stream != stream) {
    // The result's memory is released on its own stream when it is destroyed:
    // make sure the copies that read it are done by then.
    SF_CUDA(cudaStreamSynchronize(out_stream));
  }
  return Status::Ok();
}

Status top_eigenpairs(const void* G, int m, int64_t ldg, int dtype, double trace, double eta, const void* init, int k0,
                      int64_t init_s0, int64_t init_s1, const EigOptions& options, cudaStream_t stream,
                      std::unique_ptr<EigResult>* result) {
  detail::clear_stale_error();
  auto invalid = [](const std::string& msg) { return Status::Error(StatusCode::kInvalidArgument, msg); };
  if (result == nullptr) return invalid("result must not be null");
  result->reset();
  if (G == nullptr) return invalid("G must be a device pointer, got null");
  if (m < 1) return invalid("G must be at least 1 x 1, got m = " + std::to_string(m));
  if (ldg < m || ldg > std::numeric_limits<int>::max()) {
    return invalid("G's row stride must be in [m, 2^31), got " + std::to_string(ldg) + " for m = " + std::to_string(m));
  }
  if (dtype != kFloat32 && dtype != kFloat64) {
    return invalid(std::string("G must be float32 or float64, got ") + dtype_name(dtype));
  }
  if (!(std::isfinite(trace) && trace > 0.0)) return invalid("trace must be finite and > 0, got " + std::to_string(trace));
  if (!(eta > 0.0 && eta <= 1.0)) return invalid("eta must be in (0, 1], got " + std::to_string(eta));
  if (!(std::isfinite(options.tol) && options.tol > 0.0)) {
    return invalid("tol must be finite and > 0, got " + std::to_string(options.tol));
  }
  if (options.max_iter < 1) return invalid("max_iter must be >= 1, got " + std::to_string(options.max_iter));
  if (!(options.full_energy_slack >= 0.0 && options.full_energy_slack < 1.0) || options.cold_block < 1) {
    return invalid("full_energy_slack must be in [0, 1) and cold_block >= 1 (sphere_fast.eigensolver's), got " +
                   std::to_string(options.full_energy_slack) + " and " + std::to_string(options.cold_block));
  }
  if (options.method != EigMethod::kDense && options.method != EigMethod::kBlock) {
    return invalid("method must be dense or block (auto is planned by the caller)");
  }
  if (options.oversample < 0 || options.min_guards < 0 || options.min_guards > options.oversample) {
    return invalid("oversample must be >= 0 and min_guards in [0, oversample], got " +
                   std::to_string(options.oversample) + " and " + std::to_string(options.min_guards));
  }
  if (!std::isfinite(options.budget) || options.max_block < 0) {
    return invalid("budget must be finite and max_block >= 0, got " + std::to_string(options.budget) + " and " +
                   std::to_string(options.max_block));
  }
  for (double c : options.iteration_cost) {
    if (!(std::isfinite(c) && c >= 0.0)) return invalid("iteration_cost coefficients must be finite and >= 0");
  }
  if (init != nullptr && (k0 < 1 || k0 > m)) {
    return invalid("init must have between 1 and m = " + std::to_string(m) + " columns, got " + std::to_string(k0));
  }
  SF_RETURN_IF_ERROR(detail::retain_pool_memory());
  if (dtype == kFloat64) {
    return solve<double>(static_cast<const double*>(G), m, ldg, trace, eta, static_cast<const double*>(init), k0,
                         init_s0, init_s1, options, stream, result);
  }
  return solve<float>(static_cast<const float*>(G), m, ldg, trace, eta, static_cast<const float*>(init), k0, init_s0,
                      init_s1, options, stream, result);
}

}  // namespace sphere_fast
