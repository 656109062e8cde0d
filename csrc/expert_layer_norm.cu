// MoEBERT's residual LayerNorm with one affine per expert: y = LN(x + residual) * weight[e] + bias[e].
//
// The math and the contract live in moebert_kernels/ops/expert_layer_norm.py. One warp owns a row: lane l
// handles columns l, l+32, ... so a row of BERT's d=768 is 24 values a lane, re-read from L1 between the
// passes instead of being held in registers (any d works). Dtypes are runtime arguments (fp32, fp16,
// bf16, each tensor its own): under autocast the FFN output is half while the residual and the affine are
// fp32, and a uniform branch per load costs nothing next to the memory traffic.
//
// Backward: warp w owns rows [w*R, (w+1)*R) and its own fp32 slice partial[w, E, d] of the weight and bias
// gradient tables, so no address is written by two warps (no atomics); the host sums over w afterwards in
// a fixed order (deterministic).

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace moebert {
namespace {

constexpr int kWarps = 4;  // warps (rows in flight) per CTA

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

__device__ __forceinline__ float load_f(const void* p, int64_t i, int dt) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  if (dt == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ void store_f(void* p, int64_t i, int dt, float v) {
  if (dt == kF32) static_cast<float*>(p)[i] = v;
  else if (dt == kF16) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Args {
  const void* x;
  const void* r;  // nullptr: no residual
  const int64_t* ids;
  const void* w;
  const void* b;
  int64_t T, d, sx, sr;  // row strides of x and the residual (columns are contiguous)
  int dx, dr, dw, db;    // dtypes
};

__device__ __forceinline__ float z_at(const Args& a, int64_t row, int64_t c) {
  float z = load_f(a.x, row * a.sx + c, a.dx);
  if (a.r != nullptr) z += load_f(a.r, row * a.sr + c, a.dr);
  return z;
}

__global__ void _eln_fwd_kernel(Args a, void* y, int dy_t, float eps, float* mean_out, float* rstd_out) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (row >= a.T) return;
  float s = 0.f;
  for (int64_t c = lane; c < a.d; c += 32) s += z_at(a, row, c);
  const float mean = warp_sum(s) / (float)a.d;
  float v = 0.f;
  for (int64_t c = lane; c < a.d; c += 32) {
    const float zc = z_at(a, row, c) - mean;
    v += zc * zc;
  }
  const float rstd = rsqrtf(warp_sum(v) / (float)a.d + eps);
  const int64_t e = a.ids[row];
  for (int64_t c = lane; c < a.d; c += 32) {
    const float n = (z_at(a, row, c) - mean) * rstd;
    store_f(y, row * a.d + c, dy_t, n * load_f(a.w, e * a.d + c, a.dw) + load_f(a.b, e * a.d + c, a.db));
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

__global__ void _eln_bwd_kernel(Args a, const void* gy, int dgy, int64_t sgy, const float* mean_in,
                                const float* rstd_in, float* dz, float* pw, float* pb, int64_t E, int64_t rows) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int64_t r0 = warp * rows;
  if (r0 >= a.T) return;
  const int64_t r1 = r0 + rows < a.T ? r0 + rows : a.T;
  float* my_pw = pw != nullptr ? pw + warp * E * a.d : nullptr;
  float* my_pb = pb != nullptr ? pb + warp * E * a.d : nullptr;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t e = a.ids[row];
    const float mean = mean_in[row], rstd = rstd_in[row];
    float c1 = 0.f, c2 = 0.f;
    if (dz != nullptr) {
      for (int64_t c = lane; c < a.d; c += 32) {
        // __fmul_rn: never contracted into an FMA, so g here and g below round alike (see below).
        const float g = __fmul_rn(load_f(gy, row * sgy + c, dgy), load_f(a.w, e * a.d + c, a.dw));
        c1 += g;
        c2 += g * (z_at(a, row, c) - mean) * rstd;
      }
      c1 = warp_sum(c1) / (float)a.d;
      c2 = warp_sum(c2) / (float)a.d;
    }
    for (int64_t c = lane; c < a.d; c += 32) {
      const float dyv = load_f(gy, row * sgy + c, dgy);
      const float xhat = (z_at(a, row, c) - mean) * rstd;
      if (dz != nullptr) {
        // An FMA of dyv * w - c1 would subtract the rounded g from the exact product: with d = 1 (c1 == g)
        // dz came out as rstd times a rounding error instead of 0 (found on an H200, 2026-12-04).
        const float g = __fmul_rn(dyv, load_f(a.w, e * a.d + c, a.dw));
        dz[row * a.d + c] = rstd * (g - c1 - xhat * c2);
      }
      if (my_pw != nullptr) my_pw[e * a.d + c] += dyv * xhat;
      if (my_pb != nullptr) my_pb[e * a.d + c] += dyv;
    }
  }
}

// ---- host side -------------------------------------------------------------------------------

int dtype_code(const at::Tensor& t, const char* op, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "moebert_C::", op, ": ", what, " must be float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
  return -1;
}

Args make_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
               const at::Tensor& expert_ids, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "moebert_C::", op, " needs CUDA tensors; x is on ", x.device());
  // The kernels never read the column stride, so d == 1 may have any (PyTorch still calls that contiguous).
  auto rows_ok = [](const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; };
  TORCH_CHECK(x.dim() == 2 && rows_ok(x), "moebert_C::", op, ": x must be [T, d] with contiguous rows");
  const int64_t T = x.size(0), d = x.size(1);
  const bool has_r = residual.has_value() && residual->defined();
  auto same_dev = [&](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.device() == x.device(), "moebert_C::", op, ": ", what, " is on ", t.device(), " but x is on ",
                x.device());
  };
  if (has_r) {
    same_dev(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && rows_ok(*residual), "moebert_C::", op,
                ": residual must be [T, d] like x, with contiguous rows");
  }
  same_dev(expert_ids, "expert_ids");
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong && expert_ids.is_contiguous() && expert_ids.numel() == T,
              "moebert_C::", op, ": expert_ids must be a contiguous int64 [T]");
  same_dev(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == d && weight.is_contiguous(), "moebert_C::", op,
              ": weight must be a contiguous [E, d]");
  Args a{};
  a.x = x.data_ptr();
  a.r = has_r ? residual->data_ptr() : nullptr;
  a.ids = expert_ids.data_ptr<int64_t>();
  a.w = weight.data_ptr();
  a.T = T;
  a.d = d;
  a.sx = x.stride(0);
  a.sr = has_r ? residual->stride(0) : 0;
  a.dx = dtype_code(x, op, "x");
  a.dr = has_r ? dtype_code(*residual, op, "residual") : kF32;
  a.dw = dtype_code(weight, op, "weight");
  if (bias.has_value()) {
    same_dev(*bias, "bias");
    TORCH_CHECK(bias->sizes() == weight.sizes() && bias->is_contiguous(), "moebert_C::", op,
                ": bias must be a contiguous [E, d] like weight");
    a.b = bias->data_ptr();
    a.db = dtype_code(*bias, op, "bias");
  }
  return a;
}

void check_stats(const char* op, const at::Tensor& t, int64_t T, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == T, "moebert_C::",
              op, ": ", what, " must be a contiguous float32 [T] on the GPU");
}

void expert_layer_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                               const at::Tensor& expert_ids, const at::Tensor& weight, const at::Tensor& bias,
                               double eps, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd) {
  static const char* op = "expert_layer_norm_forward";
  Args a = make_args(op, x, residual, expert_ids, weight, bias);
  TORCH_CHECK(y.device() == x.device() && y.sizes() == x.sizes() && y.is_contiguous(), "moebert_C::", op,
              ": y must be a contiguous [T, d] on x's device");
  check_stats(op, mean, a.T, "mean");
  check_stats(op, rstd, a.T, "rstd");
  const int dyt = dtype_code(y, op, "y");
  if (a.T == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto grid = (unsigned)((a.T + kWarps - 1) / kWarps);
  _eln_fwd_kernel<<<grid, 32 * kWarps, 0, at::cuda::getCurrentCUDAStream()>>>(
      a, y.data_ptr(), dyt, (float)eps, mean.data_ptr<float>(), rstd.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void expert_layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                const std::optional<at::Tensor>& residual, const at::Tensor& expert_ids,
                                const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
                                const at::Tensor& dz, const at::Tensor& partial_w, const at::Tensor& partial_b,
                                int64_t rows_per_warp) {
  static const char* op = "expert_layer_norm_backward";
  Args a = make_args(op, x, residual, expert_ids, weight, std::nullopt);
  TORCH_CHECK(grad_y.device() == x.device() && grad_y.sizes() == x.sizes() &&
                  (grad_y.numel() == 0 || grad_y.size(1) <= 1 || grad_y.stride(1) == 1),
              "moebert_C::", op, ": grad_y must be [T, d] like x, with contiguous rows");
  check_stats(op, mean, a.T, "mean");
  check_stats(op, rstd, a.T, "rstd");
  TORCH_CHECK(rows_per_warp >= 1, "moebert_C::", op, ": rows_per_warp must be >= 1");
  const int64_t E = weight.size(0);
  const int64_t warps = (a.T + rows_per_warp - 1) / rows_per_warp;
  auto table = [&](const at::Tensor& t, const char* what) -> float* {
    if (t.numel() == 0) return nullptr;  // not asked for
    TORCH_CHECK(t.device() == x.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                    t.numel() >= warps * E * a.d,
                "moebert_C::", op, ": ", what, " must be a zero-filled contiguous float32 [ceil(T/rows), E, d]");
    return t.data_ptr<float>();
  };
  float* dz_p = nullptr;
  if (dz.numel() != 0) {
    TORCH_CHECK(dz.device() == x.device() && dz.scalar_type() == at::kFloat && dz.is_contiguous() &&
                    dz.sizes() == x.sizes(),
                "moebert_C::", op, ": dz must be a contiguous float32 [T, d]");
    dz_p = dz.data_ptr<float>();
  }
  float* pw = table(partial_w, "partial_w");
  float* pb = table(partial_b, "partial_b");
  if (a.T == 0 || (dz_p == nullptr && pw == nullptr && pb == nullptr)) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto grid = (unsigned)((warps + kWarps - 1) / kWarps);
  _eln_bwd_kernel<<<grid, 32 * kWarps, 0, at::cuda::getCurrentCUDAStream()>>>(
      a, grad_y.data_ptr(), dtype_code(grad_y, op, "grad_y"), grad_y.stride(0), mean.data_ptr<float>(),
      rstd.data_ptr<float>(), dz_p, pw, pb, E, rows_per_warp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace moebert

TORCH_LIBRARY_FRAGMENT(moebert_C, m) {
  // y = LN(x + residual) * weight[ids] + bias[ids]; writes y (any of fp32/fp16/bf16) and fp32 mean, rstd [T].
  m.def(
      "expert_layer_norm_forward(Tensor x, Tensor? residual, Tensor expert_ids, Tensor weight, Tensor bias, "
      "float eps, Tensor(a!) y, Tensor(b!) mean, Tensor(c!) rstd) -> ()");
  // Writes dz (fp32 [T, d]) and adds into the zero-filled per-warp tables partial_w/partial_b
  // [ceil(T / rows_per_warp), E, d]; an empty tensor skips that output.
  m.def(
      "expert_layer_norm_backward(Tensor grad_y, Tensor x, Tensor? residual, Tensor expert_ids, Tensor weight, "
      "Tensor mean, Tensor rstd, Tensor(a!) dz, Tensor(b!) partial_w, Tensor(c!) partial_b, int rows_per_warp) -> ()");
}

TORCH_LIBRARY_IMPL(moebert_C, CUDA, m) {
  m.impl("expert_layer_norm_forward", &moebert::expert_layer_norm_forward);
  m.impl("expert_layer_norm_backward", &moebert::expert_layer_norm_backward);
}

// CPU tensors reach the same entry points, whose first check names the problem.
TORCH_LIBRARY_IMPL(moebert_C, CPU, m) {
  m.impl("expert_layer_norm_forward", &moebert::expert_layer_norm_forward);
  m.impl("expert_layer_norm_backward", &moebert::expert_layer_norm_backward);
}
