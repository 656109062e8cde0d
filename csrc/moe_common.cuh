// Shared pieces of the moe_ffn element-wise kernels: conversions, activations and their
// derivatives, and the expert that owns a row in expert order. The GEMMs are CUTLASS's
// (grouped_gemm_sm90.cu, grouped_gemm_sm80.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace moebert {

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

// The expert owning sorted row s: the last e with offsets[e] <= s (offsets[0] = 0, E small).
__device__ __forceinline__ int expert_of_row(const int64_t* __restrict__ offsets, int E, int64_t s) {
  int lo = 0, hi = E;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (offsets[mid] <= s) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace moebert
