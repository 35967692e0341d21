// Fused application of the SPHERE projector, never forming P = I - alpha U U^T:
//
//     out = [W +] B - alpha (B U) U^T
//
// Stage 1, T = B U (n x r), on cuBLAS: fp32 B uses a full-fp32 GEMM
// (CUBLAS_COMPUTE_32F, no TF32: TF32 operands carry 10 mantissa bits, a unit
// roundoff of 2^-11 per product, against the fp32 contract's 1e-5); fp16/bf16
// B is read in its own dtype on tensor cores against U split into two halves of
// B's dtype, 2^12 U = u_hi + u_lo (~2^-16 relative for bf16, ~2^-22 for fp16),
// accumulated in fp32 and scaled back by 2^-12 in the GEMMs' alpha; fp64 B
// uses DGEMM. The scale (a power of two,
// exact) lifts fp16's u_lo, about 2^-11 of an entry of a unit column, out of
// fp16's subnormal range, where it would keep only a few bits.
// Stage 2, T U^T with an epilogue that reads B and W in their dtypes and writes
// out once, so the in-place update W += B - alpha (B U) U^T rounds W a single
// time. For fp16/bf16 B given the t3/u3/C workspaces: one bf16 tensor-core GEMM
// of the split operands [T_hi T_hi T_lo] [U_hi U_lo U_hi]^T (about 2^-16
// relative) into an fp32 chunk of rows, then an elementwise pass. Otherwise one
// kernel: a tiled fp32 (fp64 for fp64 B) FMA GEMM with the epilogue fused.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>

#include "common.cuh"

namespace sphere_fast {
namespace {

using detail::Launch2d;
using detail::for_each_2d;
using detail::launch_2d;

constexpr int kTileM = 128;   // rows of B / out per block
constexpr int kTileN = 128;   // columns of out per block
constexpr int kTileK = 8;     // rank slice per step
constexpr int kThreadsX = 16;
constexpr int kThreadsY = 16;
constexpr int kMicro = 8;     // each thread: 8 x 8 outputs, strided by 16
constexpr int kPad = 4;       // smem padding against bank conflicts on the transposed stores
static_assert(kTileM == kTileN, "the tile loader fills T and U rows with one index");
static_assert(kTileM == kThreadsY * kMicro && kTileN == kThreadsX * kMicro, "micro-tiles cover the tile");
static_assert((kTileM * kTileK) % (kThreadsX * kThreadsY) == 0, "each thread loads whole elements");

template <typename Acc> __device__ __forceinline__ Acc to_acc(float x) { return static_cast<Acc>(x); }
template <typename Acc> __device__ __forceinline__ Acc to_acc(double x) { return static_cast<Acc>(x); }
template <typename Acc> __device__ __forceinline__ Acc to_acc(__half x) { return static_cast<Acc>(__half2float(x)); }
template <typename Acc> __device__ __forceinline__ Acc to_acc(__nv_bfloat16 x) {
  return static_cast<Acc>(__bfloat162float(x));
}

template <typename Out> __device__ __forceinline__ Out from_acc(float v);
template <typename Out> __device__ __forceinline__ Out from_acc(double v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(double v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(double v) { return __double2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(double v) { return __double2bfloat16(v); }

// out[i, j] = [W[i, j] +] B[i, j] - alpha * prod, prod = (T U^T)[i, j].
template <typename Acc, typename BT, typename OutT>
__device__ __forceinline__ void write_out(OutT* out, const OutT* W, const BT* B, int64_t i, int64_t j, int64_t os0,
                                          int64_t os1, int64_t ws0, int64_t ws1, int64_t ldb, Acc alpha, Acc prod) {
  // An fp64 W with an fp32 update is added in fp64: W keeps its low bits.
  using Wide = std::conditional_t<(sizeof(OutT) > sizeof(Acc)), OutT, Acc>;
  Wide v = static_cast<Wide>(to_acc<Acc>(B[i * ldb + j]) - alpha * prod);
  if (W != nullptr) v += to_acc<Wide>(W[i * ws0 + j * ws1]);
  out[i * os0 + j * os1] = from_acc<OutT>(v);
}

// Tiles of out per _project_kernel launch: one block each along grid x (rows on grid y would cap n at 65535 tiles).
inline int64_t project_tiles(int64_t n, int64_t d) { return ((n + kTileM - 1) / kTileM) * ((d + kTileN - 1) / kTileN); }

// out[i, j] = [W[i, j] +] B[i, j] - alpha * sum_k T[i, k] U[j, k]
template <typename Acc, typename BT, typename OutT>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
    _project_kernel(
        // pointers
        // out may be B itself (project(B, U, out=B)): neither is __restrict__.
        OutT* out, const OutT* W, const BT* B, const Acc* __restrict__ T, const Acc* __restrict__ U,
        // sizes
        int64_t n, int64_t d, int64_t r,
        // strides (elements)
        int64_t os0, int64_t os1, int64_t ws0, int64_t ws1, int64_t ldb, int64_t ldu,
        // scalar
        Acc alpha) {
  __shared__ Acc tile_t[kTileK][kTileM + kPad];
  __shared__ Acc tile_u[kTileK][kTileN + kPad];
  const int tid = threadIdx.x;
  const int tx = tid % kThreadsX, ty = tid / kThreadsX;
  // Row-major order of tiles: consecutive blocks share a row tile of T.
  const int64_t tiles_n = (d + kTileN - 1) / kTileN;
  const int64_t tile = blockIdx.x;
  const int64_t i0 = (tile / tiles_n) * kTileM;
  const int64_t j0 = (tile % tiles_n) * kTileN;

  Acc acc[kMicro][kMicro];
#pragma unroll
  for (int a = 0; a < kMicro; ++a)
#pragma unroll
    for (int b = 0; b < kMicro; ++b) acc[a][b] = Acc(0);

  for (int64_t k0 = 0; k0 < r; k0 += kTileK) {
#pragma unroll
    for (int q = 0; q < (kTileM * kTileK) / (kThreadsX * kThreadsY); ++q) {
      const int e = tid + q * kThreadsX * kThreadsY;
      const int row = e / kTileK, kk = e % kTileK;
      const int64_t i = i0 + row, j = j0 + row, k = k0 + kk;
      tile_t[kk][row] = (i < n && k < r) ? T[i * r + k] : Acc(0);
      tile_u[kk][row] = (j < d && k < r) ? U[j * ldu + k] : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      Acc ta[kMicro], ub[kMicro];
#pragma unroll
      for (int a = 0; a < kMicro; ++a) ta[a] = tile_t[kk][ty + a * kThreadsY];
#pragma unroll
      for (int b = 0; b < kMicro; ++b) ub[b] = tile_u[kk][tx + b * kThreadsX];
#pragma unroll
      for (int a = 0; a < kMicro; ++a)
#pragma unroll
        for (int b = 0; b < kMicro; ++b) acc[a][b] = fma(ta[a], ub[b], acc[a][b]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int a = 0; a < kMicro; ++a) {
    const int64_t i = i0 + ty + a * kThreadsY;
    if (i >= n) continue;
#pragma unroll
    for (int b = 0; b < kMicro; ++b) {
      const int64_t j = j0 + tx + b * kThreadsX;
      if (j < d) write_out<Acc>(out, W, B, i, j, os0, os1, ws0, ws1, ldb, alpha, acc[a][b]);
    }
  }
}

// The tensor-core path's epilogue for output rows [i0, i0 + rows): C holds their T U^T (rows x d, fp32).
template <typename BT, typename OutT>
__global__ void _epilogue_kernel(OutT* out, const OutT* W, const BT* B, const float* __restrict__ C, int64_t i0,
                                 int64_t rows, int64_t d, int64_t os0, int64_t os1, int64_t ws0, int64_t ws1,
                                 int64_t ldb, float alpha) {
  for_each_2d(rows, d, [&](int64_t i, int64_t j) {
    write_out<float>(out, W, B, i0 + i, j, os0, os1, ws0, ws1, ldb, alpha, C[i * d + j]);
  });
}

// X (rows x r fp32, row stride ldx) -> three bf16 column blocks of a rows x ld3 matrix:
// [hi hi lo] (lo_last) or [hi lo hi]. hi + lo carries x to about 2^-16 relative.
__global__ void _split3_kernel(const float* __restrict__ X, int64_t rows, int64_t r, int64_t ldx,
                               __nv_bfloat16* __restrict__ out, int64_t ld3, bool lo_last) {
  for_each_2d(rows, r, [&](int64_t i, int64_t k) {
    const float x = X[i * ldx + k];
    const __nv_bfloat16 hi = __float2bfloat16_rn(x);
    const __nv_bfloat16 lo = __float2bfloat16_rn(x - __bfloat162float(hi));  // x - hi is exact in fp32
    __nv_bfloat16* row = out + i * ld3;
    row[k] = hi;
    row[r + k] = lo_last ? hi : lo;
    row[2 * r + k] = lo_last ? lo : hi;
  });
}

// Entries of orthonormal columns are at most 1 in magnitude: scaled by 2^12 they
// stay far below fp16's largest finite value (65504), and u_lo, about 2^-11 of
// the scaled entry, stays a normal fp16 number down to entries of 2^-15.
constexpr float kSplitScale = 4096.0f;

// kSplitScale * U (fp32, d x r, row stride ldu) -> hi + lo in a 16-bit dtype, d x r with row stride ldh.
template <typename H>
__global__ void _split_kernel(const float* __restrict__ U, int64_t d, int64_t r, int64_t ldu, H* __restrict__ hi,
                              H* __restrict__ lo, int64_t ldh) {
  for_each_2d(d, r, [&](int64_t j, int64_t k) {
    const float u = kSplitScale * U[j * ldu + k];
    const H h = from_acc<H>(u);
    hi[j * ldh + k] = h;
    lo[j * ldh + k] = from_acc<H>(u - to_acc<float>(h));
  });
}

// project() has checked that the tiles fit grid x.
template <typename Acc, typename BT, typename OutT>
Status launch_project(const ProjectArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(project_tiles(a.n, a.d)));
  _project_kernel<Acc, BT, OutT><<<grid, kThreadsX * kThreadsY, 0, stream>>>(
      static_cast<OutT*>(a.out), static_cast<const OutT*>(a.W), static_cast<const BT*>(a.B),
      static_cast<const Acc*>(a.T), static_cast<const Acc*>(a.U), a.n, a.d, a.r, a.os0, a.os1, a.ws0, a.ws1, a.ldb,
      a.ldu, static_cast<Acc>(a.alpha));
  return detail::launch_status("_project_kernel");
}

// Stage 2 on tensor cores (fp16/bf16 B, r > 0, the t3/u3/C workspaces given).
template <typename BT, typename OutT>
Status launch_project_tensor_core(const ProjectArgs& a, cublasHandle_t blas, cudaStream_t stream) {
  auto* t3 = static_cast<__nv_bfloat16*>(a.t3);
  auto* u3 = static_cast<__nv_bfloat16*>(a.u3);
  const Launch2d t_launch = launch_2d(a.n, a.r), u_launch = launch_2d(a.d, a.r);
  _split3_kernel<<<t_launch.grid, t_launch.block, 0, stream>>>(static_cast<const float*>(a.T), a.n, a.r, a.r, t3,
                                                                a.ld3, true);
  SF_RETURN_IF_ERROR(detail::launch_status("_split3_kernel"));
  _split3_kernel<<<u_launch.grid, u_launch.block, 0, stream>>>(static_cast<const float*>(a.U), a.d, a.r, a.ldu, u3,
                                                                a.ld3, false);
  SF_RETURN_IF_ERROR(detail::launch_status("_split3_kernel"));
  const float one = 1.0f, zero = 0.0f;
  const int d = static_cast<int>(a.d), k3 = static_cast<int>(3 * a.r), ld3 = static_cast<int>(a.ld3);
  for (int64_t i0 = 0; i0 < a.n; i0 += a.c_rows) {
    const int64_t rows = std::min(a.c_rows, a.n - i0);
    // Column-major view: C^T (d x rows) = (u3^T)^T (t3 rows)^T, K = 3r.
    SF_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, d, static_cast<int>(rows), k3, &one, u3, CUDA_R_16BF, ld3,
                           t3 + i0 * a.ld3, CUDA_R_16BF, ld3, &zero, a.C, CUDA_R_32F, d, CUBLAS_COMPUTE_32F,
                           CUBLAS_GEMM_DEFAULT));
    const Launch2d launch = launch_2d(rows, a.d);
    _epilogue_kernel<BT, OutT><<<launch.grid, launch.block, 0, stream>>>(
        static_cast<OutT*>(a.out), static_cast<const OutT*>(a.W), static_cast<const BT*>(a.B),
        static_cast<const float*>(a.C), i0, rows, a.d, a.os0, a.os1, a.ws0, a.ws1, a.ldb, static_cast<float>(a.alpha));
    SF_RETURN_IF_ERROR(detail::launch_status("_epilogue_kernel"));
  }
  return Status::Ok();
}

template <typename Acc, typename BT, typename OutT>
Status launch_stage_two(const ProjectArgs& a, cublasHandle_t blas, cudaStream_t stream) {
  if constexpr (std::is_same_v<BT, __half> || std::is_same_v<BT, __nv_bfloat16>) {
    if (a.t3 != nullptr && a.r > 0) return launch_project_tensor_core<BT, OutT>(a, blas, stream);
  }
  return launch_project<Acc, BT, OutT>(a, stream);
}

template <typename Acc, typename BT>
Status dispatch_out(const ProjectArgs& a, cublasHandle_t blas, cudaStream_t stream) {
  switch (a.out_dtype) {
    case kFloat32: return launch_stage_two<Acc, BT, float>(a, blas, stream);
    case kFloat64: return launch_stage_two<Acc, BT, double>(a, blas, stream);
    case kFloat16: return launch_stage_two<Acc, BT, __half>(a, blas, stream);
    case kBFloat16: return launch_stage_two<Acc, BT, __nv_bfloat16>(a, blas, stream);
    default:
      return Status::Error(StatusCode::kInvalidArgument,
                           std::string("out must be float16, bfloat16, float32 or float64, got ") +
                               dtype_name(a.out_dtype));
  }
}

// T (n x r row-major, i.e. column-major r x n) = B U.
Status stage_one(const ProjectArgs& a, cublasHandle_t blas, cudaStream_t stream) {
  if (a.r == 0) return Status::Ok();
  const int r = static_cast<int>(a.r), n = static_cast<int>(a.n), d = static_cast<int>(a.d);
  const int ldb = static_cast<int>(a.ldb), ldu = static_cast<int>(a.ldu), ldh = static_cast<int>(a.ldh);
  if (a.b_dtype == kFloat64) {
    const double one = 1.0, zero = 0.0;
    SF_CUBLAS(cublasDgemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, r, n, d, &one, static_cast<const double*>(a.U), ldu,
                          static_cast<const double*>(a.B), ldb, &zero, static_cast<double*>(a.T), r));
    return Status::Ok();
  }
  const float one = 1.0f, zero = 0.0f;
  if (a.b_dtype == kFloat32) {
    SF_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, r, n, d, &one, a.U, CUDA_R_32F, ldu, a.B, CUDA_R_32F, ldb,
                           &zero, a.T, CUDA_R_32F, r, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return Status::Ok();
  }
  const Launch2d launch = launch_2d(a.d, a.r);
  cudaDataType_t half_type;
  if (a.b_dtype == kFloat16) {
    _split_kernel<__half><<<launch.grid, launch.block, 0, stream>>>(static_cast<const float*>(a.U), a.d, a.r, a.ldu,
                                                                    static_cast<__half*>(a.u_hi),
                                                                    static_cast<__half*>(a.u_lo), a.ldh);
    half_type = CUDA_R_16F;
  } else {
    _split_kernel<__nv_bfloat16><<<launch.grid, launch.block, 0, stream>>>(
        static_cast<const float*>(a.U), a.d, a.r, a.ldu, static_cast<__nv_bfloat16*>(a.u_hi),
        static_cast<__nv_bfloat16*>(a.u_lo), a.ldh);
    half_type = CUDA_R_16BF;
  }
  SF_RETURN_IF_ERROR(detail::launch_status("_split_kernel"));
  const float unscale = 1.0f / kSplitScale;  // exact: a power of two
  SF_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, r, n, d, &unscale, a.u_hi, half_type, ldh, a.B, half_type,
                         ldb, &zero, a.T, CUDA_R_32F, r, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  SF_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, r, n, d, &unscale, a.u_lo, half_type, ldh, a.B, half_type,
                         ldb, &one, a.T, CUDA_R_32F, r, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return Status::Ok();
}

bool is_float_code(int c) { return c == kFloat32 || c == kFloat64 || c == kFloat16 || c == kBFloat16; }

int64_t dtype_bytes(int c) { return c == kFloat64 ? 8 : c == kFloat32 ? 4 : 2; }

// An n x d matrix at p with element strides (s0, s1), each >= 1 where its dimension is longer than 1 (the stride
// of a length-1 dimension is never used).
struct Layout {
  const void* p;
  int64_t n, d, s0, s1, elem;

  // The same element (i, j) at the same address and of the same dtype as in o, for every (i, j).
  bool same_as(const Layout& o) const {
    return p == o.p && elem == o.elem && n == o.n && d == o.d && (n == 1 || s0 == o.s0) && (d == 1 || s1 == o.s1);
  }
  // The offset of the last element, in elements; false where it would not fit int64 (the kernels' index math),
  // with room to count it in bytes.
  bool last_offset(int64_t* last) const {
    constexpr int64_t kMax = std::numeric_limits<int64_t>::max() / 8 - 1;
    int64_t off = 0;
    auto add = [&off](int64_t size, int64_t stride) {
      if (size <= 1) return true;
      if (stride > (kMax - off) / (size - 1)) return false;
      off += (size - 1) * stride;
      return true;
    };
    if (!add(n, s0) || !add(d, s1)) return false;
    *last = off;
    return true;
  }
  // Whether the byte ranges from the first to the last element of the two matrices intersect.
  bool may_overlap(const Layout& o) const {
    int64_t last = 0, o_last = 0;
    if (!last_offset(&last) || !o.last_offset(&o_last)) return true;
    const auto lo = reinterpret_cast<uintptr_t>(p), o_lo = reinterpret_cast<uintptr_t>(o.p);
    const uintptr_t hi = lo + static_cast<uintptr_t>((last + 1) * elem);
    const uintptr_t o_hi = o_lo + static_cast<uintptr_t>((o_last + 1) * o.elem);
    return lo < o_hi && o_lo < hi;
  }
  // Whether two elements share an address: (i - i') s0 = (j' - j) s1 has a solution other than 0 inside the
  // matrix exactly when s1 / g < n and s0 / g < d, g = gcd(s0, s1).
  bool self_overlaps() const {
    if (n == 1 || d == 1) return false;
    const int64_t g = std::gcd(s0, s1);
    return s1 / g < n && s0 / g < d;
  }
};

std::string strides_text(int64_t s0, int64_t s1) { return "(" + std::to_string(s0) + ", " + std::to_string(s1) + ")"; }

}  // namespace

Status project(const ProjectArgs& a, cudaStream_t stream) {
  detail::clear_stale_error();
  auto invalid = [](const std::string& msg) { return Status::Error(StatusCode::kInvalidArgument, msg); };
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (!is_float_code(a.b_dtype)) return invalid(std::string("B has an unsupported dtype ") + dtype_name(a.b_dtype));
  if (!is_float_code(a.out_dtype)) {
    return invalid(std::string("out has an unsupported dtype ") + dtype_name(a.out_dtype));
  }
  if (a.out == nullptr) return invalid("out must be a device pointer, got null");
  if (a.B == nullptr) return invalid("B must be a device pointer, got null");
  if (a.n < 1 || a.d < 1) {
    return invalid("B must be non-empty, got " + std::to_string(a.n) + " x " + std::to_string(a.d));
  }
  if (a.r < 0) return invalid("U must have >= 0 columns, got " + std::to_string(a.r));
  if (a.n > kIntMax || a.d > kIntMax || a.r > kIntMax) {
    return invalid("sizes must be < 2^31, got n = " + std::to_string(a.n) + ", d = " + std::to_string(a.d) +
                   ", r = " + std::to_string(a.r));
  }
  if (a.ldb < a.d || a.ldb > kIntMax) {
    return invalid("B's row stride must be in [d, 2^31) = [" + std::to_string(a.d) + ", 2^31), got " +
                   std::to_string(a.ldb));
  }
  if (a.r > 0) {
    if (a.U == nullptr) return invalid("U must be a device pointer, got null");
    if (a.T == nullptr) return invalid("T (workspace) must be a device pointer, got null");
    if (a.ldu < a.r || a.ldu > kIntMax) {
      return invalid("U's row stride must be in [r, 2^31) with r = " + std::to_string(a.r) + ", got " +
                     std::to_string(a.ldu));
    }
    if ((a.b_dtype == kFloat16 || a.b_dtype == kBFloat16) && (a.u_hi == nullptr || a.u_lo == nullptr)) {
      return invalid("u_hi and u_lo (workspace) must be device pointers for a float16/bfloat16 B, got null");
    }
    if ((a.b_dtype == kFloat16 || a.b_dtype == kBFloat16) && (a.ldh < a.r || a.ldh > kIntMax)) {
      return invalid("u_hi / u_lo's row stride ldh must be in [r, 2^31) with r = " + std::to_string(a.r) + ", got " +
                     std::to_string(a.ldh));
    }
  }
  const bool any_tc = a.t3 != nullptr || a.u3 != nullptr || a.C != nullptr;
  if (any_tc) {
    if (a.b_dtype != kFloat16 && a.b_dtype != kBFloat16) {
      return invalid(std::string("t3, u3 and C (tensor-core workspaces) are only for a float16/bfloat16 B, got ") +
                     dtype_name(a.b_dtype));
    }
    if (a.t3 == nullptr || a.u3 == nullptr || a.C == nullptr) {
      return invalid("t3, u3 and C (tensor-core workspaces) must be given together, got a null among them");
    }
    if (a.ld3 < 3 * a.r || a.ld3 > kIntMax) {
      return invalid("t3 / u3's row stride ld3 must be in [3r, 2^31) with r = " + std::to_string(a.r) + ", got " +
                     std::to_string(a.ld3));
    }
    if (a.c_rows < 1) return invalid("c_rows (rows of C) must be >= 1, got " + std::to_string(a.c_rows));
  }
  const int64_t out_elem = dtype_bytes(a.out_dtype);
  if ((a.n > 1 && a.os0 < 1) || (a.d > 1 && a.os1 < 1)) {
    return invalid("out's strides must be >= 1 along dimensions longer than 1, got " + strides_text(a.os0, a.os1));
  }
  const Layout out{a.out, a.n, a.d, a.os0, a.os1, out_elem};
  int64_t last = 0;
  if (!out.last_offset(&last)) return invalid("out's strides " + strides_text(a.os0, a.os1) + " overflow int64");
  if (out.self_overlaps()) {
    return invalid("out's strides " + strides_text(a.os0, a.os1) + " map different elements of the " +
                   std::to_string(a.n) + " x " + std::to_string(a.d) + " out to one address");
  }
  // The thread that writes out[i, j] reads W[i, j] and B[i, j] just before: an alias is safe element for element.
  if (a.W != nullptr) {
    if ((a.n > 1 && a.ws0 < 1) || (a.d > 1 && a.ws1 < 1)) {
      return invalid("W's strides must be >= 1 along dimensions longer than 1, got " + strides_text(a.ws0, a.ws1));
    }
    const Layout w{a.W, a.n, a.d, a.ws0, a.ws1, out_elem};
    if (!w.last_offset(&last)) return invalid("W's strides " + strides_text(a.ws0, a.ws1) + " overflow int64");
    if (!w.same_as(out) && w.may_overlap(out)) {
      return invalid("W must be out itself (same pointer and strides) or not overlap it, got W strides " +
                     strides_text(a.ws0, a.ws1) + " and out strides " + strides_text(a.os0, a.os1));
    }
  }
  const Layout b{a.B, a.n, a.d, a.ldb, 1, dtype_bytes(a.b_dtype)};
  if (!b.same_as(out) && b.may_overlap(out)) {
    return invalid(std::string("B must be out itself (same pointer, dtype and strides) or not overlap it, got B ") +
                   dtype_name(a.b_dtype) + " strides " + strides_text(a.ldb, 1) + " and out " +
                   dtype_name(a.out_dtype) + " strides " + strides_text(a.os0, a.os1));
  }
  const bool tensor_core = a.t3 != nullptr && a.r > 0;
  if (!tensor_core && project_tiles(a.n, a.d) > kIntMax) {
    return invalid("B of " + std::to_string(a.n) + " x " + std::to_string(a.d) +
                   " needs more than 2^31 - 1 tiles of " + std::to_string(kTileM) + " x " + std::to_string(kTileN) +
                   " (one launch of the FMA kernel)");
  }
  if (!std::isfinite(a.alpha)) return invalid("alpha must be finite, got " + std::to_string(a.alpha));

  // What a retry could cure (the cuBLAS workspace's allocation, an error of an earlier call) fails before the
  // first kernel that writes out: a failed call leaves W as it was.
  cublasHandle_t blas = nullptr;
  if (a.r > 0) SF_RETURN_IF_ERROR(detail::blas_handle(stream, &blas));
  SF_RETURN_IF_ERROR(stage_one(a, blas, stream));
  SF_RETURN_IF_ERROR(detail::launch_status("B U (stage one)"));
  switch (a.b_dtype) {
    case kFloat64: return dispatch_out<double, double>(a, blas, stream);
    case kFloat32: return dispatch_out<float, float>(a, blas, stream);
    case kFloat16: return dispatch_out<float, __half>(a, blas, stream);
    default: return dispatch_out<float, __nv_bfloat16>(a, blas, stream);
  }
}

}  // namespace sphere_fast
