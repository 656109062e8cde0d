// Shared pieces of the moe_ffn kernels: tile sizes, the (expert, row block) tile map,
// activations, and one BK-deep step of the tile matmul (WMMA for fp16/bf16, SIMT for fp32).
//
// Shared-memory layout used by every GEMM here (so one mainloop serves all of them):
//   As[k][m]  (BK x BM, ld = LDA)   the A operand, "column-major" M x K
//   Bs[k][n]  (BK x BN, ld = LDB)   the B operand, row-major K x N
//   Cs[m][n]  (BM x BN, ld = LDC)   the fp32 result, read by the epilogue
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace moebert {

constexpr int kBM = 64;   // rows (tokens, or output features for the weight grads) per CTA
constexpr int kBN = 64;   // output columns per CTA
constexpr int kBK = 32;   // reduction depth per shared-memory stage
constexpr int kThreads = 128;  // 4 warps; each owns a 32x32 quarter of the tile
// +8 elements keeps every WMMA fragment pointer 32-byte aligned and ld a multiple of 8.
constexpr int kLDA = kBM + 8;
constexpr int kLDB = kBN + 8;
constexpr int kLDC = kBN + 4;  // fp32, ld a multiple of 4 for wmma::store_matrix_sync

enum Activation : int { kGelu = 0, kGeluTanh = 1, kRelu = 2 };

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ T zero_of() { return from_float<T>(0.f); }

__device__ __forceinline__ float act_fwd(float x, int act) {
  if (act == kGelu) return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  if (act == kGeluTanh) {
    const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.f + tanhf(u));
  }
  return x > 0.f ? x : 0.f;
}

__device__ __forceinline__ float act_grad(float x, int act) {
  if (act == kGelu) {
    // d/dx [x Phi(x)] = Phi(x) + x phi(x)
    return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.39894228040143268f * expf(-0.5f * x * x);
  }
  if (act == kGeluTanh) {
    const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    const float t = tanhf(u);
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * 0.79788456080286536f * (1.f + 0.134145f * x * x);
  }
  return x > 0.f ? 1.f : 0.f;
}

// Map a linear tile id to (expert, first row, end row) when each expert's rows
// [offsets[e], offsets[e+1]) are cut into blocks of `rows` rows. Grids are sized
// cdiv(T, rows) + E, an upper bound on the number of blocks, so nothing is read on the
// host; tiles past the last block return false and the CTA exits. Every thread runs
// this (uniform control flow, no shared memory needed); E is small.
__device__ __forceinline__ bool map_tile(const int64_t* __restrict__ offsets, int E, int64_t tile, int rows,
                                         int& e, int64_t& row0, int64_t& row_end) {
  int64_t seen = 0;
  for (int i = 0; i < E; ++i) {
    const int64_t lo = offsets[i], hi = offsets[i + 1];
    const int64_t nb = (hi - lo + rows - 1) / rows;
    if (tile < seen + nb) {
      e = i;
      row0 = lo + (tile - seen) * rows;
      row_end = hi;
      return true;
    }
    seen += nb;
  }
  return false;
}

// ---- tile matmul: Cs += As^T-layout x Bs over one BK stage -----------------------------

// fp32 (and 16-bit types where WMMA lacks them, see TileMma): SIMT, each thread an 8x4
// micro-tile, rows ty + 8i and columns tx + 16j so that a warp's shared-memory reads are
// broadcasts (As) or consecutive words (Bs). Products and sums in fp32.
template <typename T>
struct MmaSimt {
  float acc[8][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }
  __device__ __forceinline__ void step(const T* As, const T* Bs) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 4
    for (int k = 0; k < kBK; ++k) {
      float a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = to_float(As[k * kLDA + ty + 8 * i]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = to_float(Bs[k * kLDB + tx + 16 * j]);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* Cs) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(ty + 8 * i) * kLDC + tx + 16 * j] = acc[i][j];
  }
};

// fp16/bf16: tensor cores through WMMA 16x16x16 fragments with fp32 accumulators.
// Warp w owns rows (w/2)*32.. and columns (w%2)*32..: 2x2 fragments.
template <typename T>
struct MmaWmma {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }
  __device__ __forceinline__ void step(const T* As, const T* Bs) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + kk * kLDA + wm + 16 * i, kLDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + kk * kLDB + wn + 16 * j, kLDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* Cs) {
    const int warp = threadIdx.x / 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(Cs + (wm + 16 * i) * kLDC + wn + 16 * j, acc[i][j], kLDC,
                                        nvcuda::wmma::mem_row_major);
  }
};

// bf16 WMMA fragments exist only from sm_80 (fp16 from sm_70): compiled for an older arch
// (TORCH_CUDA_ARCH_LIST with 7.5, e.g. a T4), bf16 takes the SIMT path instead of failing to
// build ("incomplete type wmma::fragment<..., __nv_bfloat16, ...>"). The host pass never
// instantiates the kernel bodies, so it may see either choice.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kWmmaBf16 = false;
#else
constexpr bool kWmmaBf16 = true;
#endif

template <typename T>
using TileMma = typename std::conditional<std::is_same<T, float>::value ||
                                              (std::is_same<T, __nv_bfloat16>::value && !kWmmaBf16),
                                          MmaSimt<T>, MmaWmma<T>>::type;

}  // namespace moebert
