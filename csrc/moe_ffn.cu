// Top-1 routed expert FFN pieces for the cuda backend (moebert_kernels/cuda/moe_ffn.py puts
// them together):
//   y_t = g_t * (W2[e] act(W1[e] x_t + b1[e]) + b2[e] + shared_t)
//
// grouped_gemm       : the six GEMMs of the layer, on CUTLASS (grouped_gemm.h); sm_90a through
//                      a CUTLASS 3.x pointer-array TMA kernel, otherwise CUTLASS 2.x grouped.
// grouped_gemm_plan  : what the device-side argument builder computes per expert (for tests).
// moe_bias_act       : H += b1[e]; A = act(H) (gated: act(a) * g), one 16-byte pass.
// moe_scatter_rows   : out[t] = g_t * (rows[s] + b[e] + add[t]), t = sorted_token_ids[s].
// moe_act_backward   : dH from P = dY W2[e] and H; g*A for dW2; dgate_t (one block per row,
//                      a fixed-order reduction: deterministic).
// moe_segment_colsum : per-expert column sums (the bias grads) as fixed-order partials.
//
// Nothing here reads expert_offsets on the host: no sync, CUDA-graph capturable.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <exception>

#include "grouped_gemm.h"
#include "moe_common.cuh"

#define MOEBERT_DISPATCH_FLOAT(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)      \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)   \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace moebert {
namespace {

template <typename T>
struct CudaType { using type = T; };
template <>
struct CudaType<at::Half> { using type = __half; };
template <>
struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename scalar_t>
const typename CudaType<scalar_t>::type* cptr(const at::Tensor& t) {
  return t.defined() && t.numel() ? reinterpret_cast<const typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>())
                                  : nullptr;
}
template <typename scalar_t>
typename CudaType<scalar_t>::type* mptr(const at::Tensor& t) {
  return t.defined() && t.numel() ? reinterpret_cast<typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>())
                                  : nullptr;
}

// VEC elements moved as one 16-byte (or narrower) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) { return *reinterpret_cast<const Pack<T, VEC>*>(p); }
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) { *reinterpret_cast<Pack<T, VEC>*>(p) = v; }

// ---- kernels --------------------------------------------------------------------------------

// h [T, hu] (hu = 2 * width when gated): h += bias[e]; a [T, width] = act(h) (gated: act(h_a) * h_g),
// the activation taken of the rounded h so a backward that reloads h sees the same numbers.
template <typename T, int VEC>
__global__ void _bias_act_kernel(T* __restrict__ h, const T* __restrict__ bias, const int64_t* __restrict__ offsets,
                                 int E, int64_t rows, int width, bool gated, int act, T* __restrict__ a) {
  const int hu = gated ? 2 * width : width;
  const int64_t packs = (int64_t)width / VEC;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * packs;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t s = i / packs;
    const int c = (int)(i % packs) * VEC;
    T* hs = h + s * hu + c;
    Pack<T, VEC> ha = load_pack<T, VEC>(hs), hg, out;
    if (gated) hg = load_pack<T, VEC>(hs + width);
    if (bias != nullptr) {
      const T* be = bias + (int64_t)expert_of_row(offsets, E, s) * hu + c;
      const Pack<T, VEC> ba = load_pack<T, VEC>(be);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ha.v[j] = from_float<T>(to_float(ha.v[j]) + to_float(ba.v[j]));
      store_pack<T, VEC>(hs, ha);
      if (gated) {
        const Pack<T, VEC> bg = load_pack<T, VEC>(be + width);
#pragma unroll
        for (int j = 0; j < VEC; ++j) hg.v[j] = from_float<T>(to_float(hg.v[j]) + to_float(bg.v[j]));
        store_pack<T, VEC>(hs + width, hg);
      }
    }
    if (a == nullptr) continue;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float v = act_fwd(to_float(ha.v[j]), act);
      if (gated) v *= to_float(hg.v[j]);
      out.v[j] = from_float<T>(v);
    }
    store_pack<T, VEC>(a + s * width + c, out);
  }
}

// out[t] = g_t * (rows[s] + bias[e] + add[t]) with t = idx[s]; bias, gate, add optional.
template <typename T, int VEC>
__global__ void _scatter_rows_kernel(const T* __restrict__ rows_in, const int64_t* __restrict__ idx,
                                     const int64_t* __restrict__ offsets, int E, int64_t rows, int n,
                                     const T* __restrict__ bias, const float* __restrict__ gate,
                                     const T* __restrict__ add, T* __restrict__ out) {
  const int64_t packs = (int64_t)n / VEC;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * packs;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t s = i / packs;
    const int c = (int)(i % packs) * VEC;
    const int64_t t = idx[s];
    const Pack<T, VEC> r = load_pack<T, VEC>(rows_in + s * n + c);
    float v[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = to_float(r.v[j]);
    if (bias != nullptr) {
      const Pack<T, VEC> b = load_pack<T, VEC>(bias + (int64_t)expert_of_row(offsets, E, s) * n + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] += to_float(b.v[j]);
    }
    if (add != nullptr) {
      const Pack<T, VEC> p = load_pack<T, VEC>(add + t * n + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] += to_float(p.v[j]);
    }
    const float g = gate != nullptr ? gate[t] : 1.f;
    Pack<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(g * v[j]);
    store_pack<T, VEC>(out + t * n + c, o);
  }
}

constexpr int kRowThreads = 128;

// One block per sorted row s (token t = idx[s], gate g = gate[t] or 1), p = (dY W2[e])[s]:
//   plain : dh = g p act'(h);  ga = g act(h);  dot = p . act(h)
//   gated : h = [h_a | h_g]:  dh_a = g p h_g act'(h_a),  dh_g = g p act(h_a);  ga = g act(h_a) h_g
// dgate[t] = dot + dY_t . b2[e] (fp32), summed in a fixed order.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) _act_backward_kernel(
    const T* __restrict__ p, const T* __restrict__ h, const int64_t* __restrict__ idx,
    const int64_t* __restrict__ offsets, int E, int width, bool gated, int act, const float* __restrict__ gate,
    const T* __restrict__ dy, const T* __restrict__ b2, int d_out, T* __restrict__ dh, T* __restrict__ ga,
    float* __restrict__ dgate) {
  const int64_t s = blockIdx.x;
  const int64_t t = idx[s];
  const int hu = gated ? 2 * width : width;
  const float g = gate != nullptr ? gate[t] : 1.f;
  float dot = 0.f;
  for (int c = threadIdx.x * VEC; c < width; c += kRowThreads * VEC) {
    const Pack<T, VEC> pv = load_pack<T, VEC>(p + s * width + c);
    const Pack<T, VEC> ha = load_pack<T, VEC>(h + s * hu + c);
    Pack<T, VEC> hg, da, dgv, gav;
    if (gated) hg = load_pack<T, VEC>(h + s * hu + width + c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float pj = to_float(pv.v[j]), x = to_float(ha.v[j]);
      const float av = act_fwd(x, act);
      const float gj = gated ? to_float(hg.v[j]) : 1.f;
      da.v[j] = from_float<T>(g * pj * gj * act_grad(x, act));
      if (gated) dgv.v[j] = from_float<T>(g * pj * av);
      gav.v[j] = from_float<T>(g * av * gj);
      dot += pj * av * gj;
    }
    store_pack<T, VEC>(dh + s * hu + c, da);
    if (gated) store_pack<T, VEC>(dh + s * hu + width + c, dgv);
    if (ga != nullptr) store_pack<T, VEC>(ga + s * width + c, gav);
  }
  if (dgate == nullptr) return;
  if (b2 != nullptr) {
    const T* be = b2 + (int64_t)expert_of_row(offsets, E, s) * d_out;
    for (int c = threadIdx.x; c < d_out; c += kRowThreads) dot += to_float(dy[t * d_out + c]) * to_float(be[c]);
  }
  __shared__ float warp_sums[kRowThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kRowThreads / 32; ++w) total += warp_sums[w];
    dgate[t] = total;
  }
}

// partial[e, split, c] = sum over split's share of expert e's rows of scale[idx[s]] * x[s, c].
template <typename T>
__global__ void _segment_colsum_kernel(const T* __restrict__ x, int n, const int64_t* __restrict__ offsets,
                                       const int64_t* __restrict__ idx, const float* __restrict__ scale, int splits,
                                       float* __restrict__ partial) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int split = blockIdx.y, e = blockIdx.z;
  if (c >= n) return;
  const int64_t lo = offsets[e], hi = offsets[e + 1];
  const int64_t chunk = (hi - lo + splits - 1) / splits;
  const int64_t r0 = lo + split * chunk;
  const int64_t r1 = r0 + chunk < hi ? r0 + chunk : hi;
  float acc = 0.f;
  for (int64_t s = r0; s < r1; ++s) {
    const float v = to_float(x[s * n + c]);
    acc += scale != nullptr ? scale[idx[s]] * v : v;
  }
  partial[((int64_t)e * splits + split) * n + c] = acc;
}

// The weight grad of an expert with no rows is zero; its GEMM had no tiles (grouped_gemm.h).
template <typename T>
__global__ void _zero_empty_groups_kernel(T* __restrict__ out, const int64_t* __restrict__ offsets, int64_t per_group) {
  const int64_t e = blockIdx.y;
  if (offsets[e + 1] > offsets[e]) return;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < per_group; i += (int64_t)gridDim.x * blockDim.x)
    out[e * per_group + i] = zero_of<T>();
}

__global__ void _plan_kernel(const int64_t* __restrict__ offsets, int64_t E, int kind, int64_t M, int64_t N, int64_t K,
                             int64_t* __restrict__ out) {
  const int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (e >= E) return;
  const GroupProblem p = group_problem(kind, e, offsets[e], offsets[e + 1], M, N, K);
  const int64_t v[6] = {p.m, p.n, p.k, p.a_off, p.b_off, p.d_off};
  for (int j = 0; j < 6; ++j) out[e * 6 + j] = v[j];
}

// ---- host side -------------------------------------------------------------------------------

unsigned grid_for(int64_t work, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (work + threads - 1) / threads;
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>(want, sms * 32));
}

// The widest pack (up to 16 bytes) that divides every row length and keeps every base aligned.
int pack_width(int elem_bytes, std::initializer_list<int64_t> lengths, std::initializer_list<const at::Tensor*> ts) {
  int vec = 16 / elem_bytes;
  auto fits = [&](int v) {
    for (int64_t n : lengths)
      if (n % v) return false;
    for (const at::Tensor* t : ts)
      if (t->defined() && t->numel() && reinterpret_cast<uintptr_t>(t->data_ptr()) % (v * elem_bytes)) return false;
    return true;
  };
  while (vec > 1 && !fits(vec)) vec /= 2;
  return vec;
}

#define MOEBERT_DISPATCH_VEC(VEC_VALUE, ...)                  \
  [&] {                                                       \
    switch (VEC_VALUE) {                                      \
      case 8: { constexpr int VEC = 8; return __VA_ARGS__(); } \
      case 4: { constexpr int VEC = 4; return __VA_ARGS__(); } \
      case 2: { constexpr int VEC = 2; return __VA_ARGS__(); } \
      default: { constexpr int VEC = 1; return __VA_ARGS__(); } \
    }                                                         \
  }()

void check_device(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "moebert_C::", op, " needs CUDA tensors; ", name, " is on ", t.device(),
              " (use the torch or triton backend for CPU tensors)");
  TORCH_CHECK(t.device() == ref.device(), "moebert_C::", op, ": ", name, " is on ", t.device(), " but ",
              "the first input is on ", ref.device());
  TORCH_CHECK(t.is_contiguous(), "moebert_C::", op, ": ", name, " must be contiguous (call .contiguous())");
}

void check_opt(const c10::optional<at::Tensor>& t, const char* op, const char* name, const at::Tensor& ref) {
  if (t.has_value() && t->defined()) check_device(*t, op, name, ref);
}

void check_shape(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "moebert_C::", op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_dtype(const at::Tensor& t, const char* op, const char* name, at::ScalarType dt) {
  TORCH_CHECK(t.scalar_type() == dt, "moebert_C::", op, ": ", name, " must be ", dt, ", got ", t.scalar_type());
}

int64_t check_offsets(const at::Tensor& offsets, const char* op, const at::Tensor& ref) {
  check_device(offsets, op, "expert_offsets", ref);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) >= 2, "moebert_C::", op,
              ": expert_offsets must be int64 [E+1] with E >= 1, got ", offsets.scalar_type(), " ", offsets.sizes());
  return offsets.size(0) - 1;
}

const float* gate_ptr(const c10::optional<at::Tensor>& gate, const char* op, const at::Tensor& ref, int64_t T) {
  if (!gate.has_value() || !gate->defined()) return nullptr;
  check_device(*gate, op, "gate", ref);
  check_dtype(*gate, op, "gate (convert it with .float())", at::kFloat);
  check_shape(*gate, op, "gate", {T});
  return gate->data_ptr<float>();
}

int dtype_code(at::ScalarType dt) { return dt == at::kFloat ? 0 : dt == at::kHalf ? 1 : 2; }

at::Tensor given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? *t : at::Tensor(); }

void check_ids(const at::Tensor& ids, const char* op, const at::Tensor& ref, int64_t T) {
  check_device(ids, op, "sorted_token_ids", ref);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.sizes() == at::IntArrayRef({T}), "moebert_C::", op,
              ": sorted_token_ids must be int64 [T=", T, "], got ", ids.scalar_type(), " ", ids.sizes());
}

void check_activation(int64_t activation, const char* op) {
  TORCH_CHECK(activation >= 0 && activation <= 2, "moebert_C::", op,
              ": activation code must be 0 (gelu), 1 (gelu_tanh) or 2 (relu), got ", activation);
}

void grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets, int64_t kind,
                  const at::Tensor& out, int64_t impl) {
  const char* op = "grouped_gemm";
  check_device(a, op, "a", a);
  check_device(b, op, "b", a);
  check_device(out, op, "out", a);
  const int64_t E = check_offsets(expert_offsets, op, a);
  TORCH_CHECK(kind >= 0 && kind <= 2, "moebert_C::", op, ": kind must be 0 (rows x W^T), 1 (rows x W) or ",
              "2 (weight grad), got ", kind);
  TORCH_CHECK(impl >= 0 && impl <= 2, "moebert_C::", op, ": impl must be 0 (auto), 1 (sm80) or 2 (sm90), got ", impl);
  const auto dt = a.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "moebert_C::", op,
              ": a must be float32, float16 or bfloat16, got ", dt);
  check_dtype(b, op, "b", dt);
  check_dtype(out, op, "out", dt);
  TORCH_CHECK(a.dim() == 2, "moebert_C::", op, ": a must be 2-D [rows, k], got ", a.sizes());
  const int64_t T = a.size(0);
  int64_t M = 0, N = 0, K = 0;
  if (kind == kWeightGrad) {
    M = a.size(1);
    TORCH_CHECK(b.dim() == 2 && b.size(0) == T, "moebert_C::", op, ": weight grad: b must be [rows=", T, ", n], got ",
                b.sizes());
    N = b.size(1);
    check_shape(out, op, "out", {E, M, N});
  } else {
    K = a.size(1);
    TORCH_CHECK(b.dim() == 3 && b.size(0) == E, "moebert_C::", op, ": b must be [E=", E, ", ...], got ", b.sizes());
    if (kind == kRowsByWeightT) {
      N = b.size(1);
      TORCH_CHECK(b.size(2) == K, "moebert_C::", op, ": b must be [E, n, k=", K, "], got ", b.sizes());
    } else {
      N = b.size(2);
      TORCH_CHECK(b.size(1) == K, "moebert_C::", op, ": b must be [E, k=", K, ", n], got ", b.sizes());
    }
    check_shape(out, op, "out", {T, N});
  }
  if (dt != at::kFloat) {  // 16-byte TMA / cp.async accesses
    const int64_t lead[3] = {kind == kWeightGrad ? M : K, N, N};
    for (int64_t n : lead)
      TORCH_CHECK(n % 8 == 0, "moebert_C::", op, ": 16-bit grouped GEMMs need feature sizes that are multiples of 8 ",
                  "(got M=", M, ", N=", N, ", K=", K, "); pad them (moebert_kernels.cuda.moe_ffn does)");
    for (const at::Tensor* t : {&a, &b, &out})
      TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "moebert_C::", op,
                  ": operands must be 16-byte aligned (clone the tensor)");
  }
  const c10::cuda::CUDAGuard guard(a.device());
  if (T == 0 || (kind != kWeightGrad && N == 0)) {
    if (kind == kWeightGrad) out.zero_();
    return;
  }
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const bool sm90 = dt != at::kFloat && sm90_grouped_gemm_built() && props->major == 9;
  TORCH_CHECK(impl != 2 || sm90, "moebert_C::", op, ": impl=2 (sm90) needs a float16/bfloat16 call on an sm_90 GPU ",
              "and a build with 9.0a in TORCH_CUDA_ARCH_LIST");
  const bool use_sm90 = impl == 2 || (impl == 0 && sm90);
  GroupedGemmCall call{};
  call.kind = (int)kind;
  call.dtype = dtype_code(dt);
  call.E = E;
  call.M = M;
  call.N = N;
  call.K = K;
  call.a = a.data_ptr();
  call.b = b.data_ptr();
  call.d = out.data_ptr();
  call.offsets = expert_offsets.data_ptr<int64_t>();
  call.device = a.get_device();
  call.stream = at::cuda::getCurrentCUDAStream().stream();
  const auto bytes = a.options().dtype(at::kByte);
  try {
    if (use_sm90) {
      at::Tensor args = at::empty({sm90_grouped_gemm_args_bytes(E)}, bytes);
      call.args = args.data_ptr();
      call.workspace_bytes = sm90_grouped_gemm_workspace_bytes(call);
      at::Tensor ws = at::empty({std::max<int64_t>(call.workspace_bytes, 1)}, bytes);
      call.workspace = ws.data_ptr();
      sm90_grouped_gemm(call);
    } else {
      at::Tensor args = at::empty({sm80_grouped_gemm_args_bytes(E)}, bytes);
      call.args = args.data_ptr();
      sm80_grouped_gemm(call);
    }
  } catch (const std::exception& exc) {
    TORCH_CHECK(false, "moebert_C::", op, ": ", exc.what());
  }
  if (kind == kWeightGrad) {
    MOEBERT_DISPATCH_FLOAT(dt, "grouped_gemm", [&] {
      using T_ = typename CudaType<scalar_t>::type;
      const dim3 grid(grid_for(M * N, 256) / (unsigned)std::min<int64_t>(E, 8) + 1, (unsigned)E);
      _zero_empty_groups_kernel<T_><<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
          mptr<scalar_t>(out), expert_offsets.data_ptr<int64_t>(), M * N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

// The host twin of the argument builder; CPU tensors run group_problem() here, CUDA tensors run
// the same function in a kernel (the GEMM launchers build their arrays with it too).
at::Tensor grouped_gemm_plan(const at::Tensor& expert_offsets, int64_t kind, int64_t M, int64_t N, int64_t K) {
  const char* op = "grouped_gemm_plan";
  TORCH_CHECK(kind >= 0 && kind <= 2, "moebert_C::", op, ": kind must be 0, 1 or 2, got ", kind);
  TORCH_CHECK(expert_offsets.scalar_type() == at::kLong && expert_offsets.dim() == 1 && expert_offsets.size(0) >= 2,
              "moebert_C::", op, ": expert_offsets must be int64 [E+1] with E >= 1, got ",
              expert_offsets.scalar_type(), " ", expert_offsets.sizes());
  const at::Tensor off = expert_offsets.contiguous();
  const int64_t E = off.size(0) - 1;
  at::Tensor out = at::empty({E, 6}, off.options());
  if (off.is_cuda()) {
    const c10::cuda::CUDAGuard guard(off.device());
    _plan_kernel<<<(unsigned)((E + 127) / 128), 128, 0, at::cuda::getCurrentCUDAStream()>>>(
        off.data_ptr<int64_t>(), E, (int)kind, M, N, K, out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  const int64_t* o = off.data_ptr<int64_t>();
  int64_t* r = out.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    const GroupProblem p = group_problem((int)kind, e, o[e], o[e + 1], M, N, K);
    const int64_t v[6] = {p.m, p.n, p.k, p.a_off, p.b_off, p.d_off};
    for (int j = 0; j < 6; ++j) r[e * 6 + j] = v[j];
  }
  return out;
}

void moe_bias_act(const at::Tensor& h, const c10::optional<at::Tensor>& bias, const at::Tensor& expert_offsets,
                  int64_t activation, bool gated, const at::Tensor& a) {
  const char* op = "moe_bias_act";
  check_device(h, op, "h", h);
  check_opt(bias, op, "bias", h);
  const int64_t E = check_offsets(expert_offsets, op, h);
  check_activation(activation, op);
  TORCH_CHECK(h.dim() == 2 && (!gated || h.size(1) % 2 == 0), "moebert_C::", op, ": h must be [T, ",
              gated ? "2h" : "h", "], got ", h.sizes());
  const int64_t T = h.size(0), hu = h.size(1), width = gated ? hu / 2 : hu;
  const bool has_a = a.numel() != 0;
  if (has_a) {
    check_device(a, op, "a", h);
    check_shape(a, op, "a", {T, width});
    check_dtype(a, op, "a", h.scalar_type());
  }
  const at::Tensor b = given(bias);
  if (b.defined()) {
    check_shape(b, op, "bias", {E, hu});
    check_dtype(b, op, "bias", h.scalar_type());
  }
  if (T == 0 || width == 0 || (!has_a && !b.defined())) return;
  const c10::cuda::CUDAGuard guard(h.device());
  MOEBERT_DISPATCH_FLOAT(h.scalar_type(), "moe_bias_act", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    const int vec = pack_width(sizeof(T_), {width}, {&h, &b, &a});
    MOEBERT_DISPATCH_VEC(vec, [&] {
      _bias_act_kernel<T_, VEC><<<grid_for(T * width / VEC, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
          mptr<scalar_t>(h), cptr<scalar_t>(b), expert_offsets.data_ptr<int64_t>(), (int)E, T, (int)width, gated,
          (int)activation, has_a ? mptr<scalar_t>(a) : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void moe_scatter_rows(const at::Tensor& rows, const at::Tensor& sorted_token_ids, const at::Tensor& expert_offsets,
                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& gate,
                      const c10::optional<at::Tensor>& add, const at::Tensor& out) {
  const char* op = "moe_scatter_rows";
  check_device(rows, op, "rows", rows);
  check_device(out, op, "out", rows);
  check_opt(bias, op, "bias", rows);
  check_opt(add, op, "add", rows);
  const int64_t E = check_offsets(expert_offsets, op, rows);
  TORCH_CHECK(rows.dim() == 2, "moebert_C::", op, ": rows must be [T, n], got ", rows.sizes());
  const int64_t T = rows.size(0), n = rows.size(1);
  const auto dt = rows.scalar_type();
  check_shape(out, op, "out", rows.sizes());
  check_dtype(out, op, "out", dt);
  check_ids(sorted_token_ids, op, rows, T);
  const at::Tensor b = given(bias), ad = given(add);
  if (b.defined()) { check_shape(b, op, "bias", {E, n}); check_dtype(b, op, "bias", dt); }
  if (ad.defined()) { check_shape(ad, op, "add", {T, n}); check_dtype(ad, op, "add", dt); }
  const float* g = gate_ptr(gate, op, rows, T);
  if (T == 0 || n == 0) return;
  const c10::cuda::CUDAGuard guard(rows.device());
  MOEBERT_DISPATCH_FLOAT(dt, "moe_scatter_rows", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    const int vec = pack_width(sizeof(T_), {n}, {&rows, &b, &ad, &out});
    MOEBERT_DISPATCH_VEC(vec, [&] {
      _scatter_rows_kernel<T_, VEC><<<grid_for(T * n / VEC, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
          cptr<scalar_t>(rows), sorted_token_ids.data_ptr<int64_t>(), expert_offsets.data_ptr<int64_t>(), (int)E, T,
          (int)n, cptr<scalar_t>(b), g, cptr<scalar_t>(ad), mptr<scalar_t>(out));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void moe_act_backward(const at::Tensor& p, const at::Tensor& h, const at::Tensor& sorted_token_ids,
                      const at::Tensor& expert_offsets, const c10::optional<at::Tensor>& gate,
                      const c10::optional<at::Tensor>& grad_out, const c10::optional<at::Tensor>& b2,
                      int64_t activation, bool gated, const at::Tensor& dh, const at::Tensor& ga,
                      const at::Tensor& dgate) {
  const char* op = "moe_act_backward";
  check_device(p, op, "p", p);
  check_device(h, op, "h", p);
  check_device(dh, op, "dh", p);
  check_opt(grad_out, op, "grad_out", p);
  check_opt(b2, op, "b2", p);
  const int64_t E = check_offsets(expert_offsets, op, p);
  check_activation(activation, op);
  TORCH_CHECK(p.dim() == 2, "moebert_C::", op, ": p must be [T, h], got ", p.sizes());
  const int64_t T = p.size(0), width = p.size(1), hu = gated ? 2 * width : width;
  const auto dt = p.scalar_type();
  check_shape(h, op, "h", {T, hu});
  check_shape(dh, op, "dh", {T, hu});
  for (const auto* t : {&h, &dh}) check_dtype(*t, op, "h and dh", dt);
  check_ids(sorted_token_ids, op, p, T);
  const bool has_ga = ga.numel() != 0, has_dgate = dgate.numel() != 0;
  if (has_ga) { check_device(ga, op, "ga", p); check_shape(ga, op, "ga", {T, width}); check_dtype(ga, op, "ga", dt); }
  const float* g = gate_ptr(gate, op, p, T);
  const at::Tensor dy = given(grad_out), bb = given(b2);
  int64_t d_out = 0;
  if (has_dgate) {
    check_device(dgate, op, "dgate", p);
    check_dtype(dgate, op, "dgate", at::kFloat);
    check_shape(dgate, op, "dgate", {T});
    if (bb.defined()) {
      TORCH_CHECK(dy.defined(), "moebert_C::", op, ": the gate grad with b2 needs grad_out");
      d_out = bb.size(1);
      check_shape(bb, op, "b2", {E, d_out});
      check_shape(dy, op, "grad_out", {T, d_out});
      check_dtype(bb, op, "b2", dt);
      check_dtype(dy, op, "grad_out", dt);
    }
  }
  if (T == 0) return;
  const c10::cuda::CUDAGuard guard(p.device());
  MOEBERT_DISPATCH_FLOAT(dt, "moe_act_backward", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    const int vec = pack_width(sizeof(T_), {width}, {&p, &h, &dh, &ga});
    MOEBERT_DISPATCH_VEC(vec, [&] {
      _act_backward_kernel<T_, VEC><<<(unsigned)T, kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          cptr<scalar_t>(p), cptr<scalar_t>(h), sorted_token_ids.data_ptr<int64_t>(),
          expert_offsets.data_ptr<int64_t>(), (int)E, (int)width, gated, (int)activation, g,
          has_dgate ? cptr<scalar_t>(dy) : nullptr, has_dgate ? cptr<scalar_t>(bb) : nullptr, (int)d_out,
          mptr<scalar_t>(dh), has_ga ? mptr<scalar_t>(ga) : nullptr, has_dgate ? dgate.data_ptr<float>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void moe_segment_colsum(const at::Tensor& x, const at::Tensor& expert_offsets, const c10::optional<at::Tensor>& scale,
                        const c10::optional<at::Tensor>& sorted_token_ids, const at::Tensor& partial) {
  const char* op = "moe_segment_colsum";
  check_device(x, op, "x", x);
  check_device(partial, op, "partial", x);
  const int64_t E = check_offsets(expert_offsets, op, x);
  TORCH_CHECK(x.dim() == 2, "moebert_C::", op, ": x must be [T, n], got ", x.sizes());
  const int64_t T = x.size(0), n = x.size(1);
  TORCH_CHECK(partial.dim() == 3 && partial.size(0) == E && partial.size(2) == n && partial.size(1) >= 1,
              "moebert_C::", op, ": partial must be [E=", E, ", splits, n=", n, "], got ", partial.sizes());
  check_dtype(partial, op, "partial", at::kFloat);
  const float* s = gate_ptr(scale, op, x, T);
  const int64_t* idx = nullptr;
  if (s != nullptr) {
    TORCH_CHECK(sorted_token_ids.has_value(), "moebert_C::", op, ": a scale needs sorted_token_ids");
    check_ids(*sorted_token_ids, op, x, T);
    idx = sorted_token_ids->data_ptr<int64_t>();
  }
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int splits = (int)partial.size(1);
  MOEBERT_DISPATCH_FLOAT(x.scalar_type(), "moe_segment_colsum", [&] {
    const dim3 grid((unsigned)((n + 127) / 128), (unsigned)splits, (unsigned)E);
    _segment_colsum_kernel<<<grid, 128, 0, at::cuda::getCurrentCUDAStream()>>>(
        cptr<scalar_t>(x), (int)n, expert_offsets.data_ptr<int64_t>(), idx, s, splits, partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace moebert

TORCH_LIBRARY_FRAGMENT(moebert_C, m) {
  // kind: 0 out[s] = a[s] b[e]^T (b [E, n, k]); 1 out[s] = a[s] b[e] (b [E, k, n]);
  // 2 out[e] = a[rows e]^T b[rows e] (a [T, m], b [T, n], out [E, m, n]). impl: 0 auto, 1 sm80, 2 sm90.
  m.def("grouped_gemm(Tensor a, Tensor b, Tensor expert_offsets, int kind, Tensor(a!) out, int impl=0) -> ()");
  // [E, 6] int64: (m, n, k, a_off, b_off, d_off) per expert, as the GEMM argument builder computes them.
  m.def("grouped_gemm_plan(Tensor expert_offsets, int kind, int M, int N, int K) -> Tensor");
  // activation: 0 gelu (erf), 1 gelu_tanh, 2 relu. a may be empty (bias only).
  m.def("moe_bias_act(Tensor(a!) h, Tensor? bias, Tensor expert_offsets, int activation, bool gated, "
        "Tensor(b!) a) -> ()");
  m.def("moe_scatter_rows(Tensor rows, Tensor sorted_token_ids, Tensor expert_offsets, Tensor? bias, Tensor? gate, "
        "Tensor? add, Tensor(a!) out) -> ()");
  // ga, dgate may be empty (not wanted); gate is fp32 [T]; dgate fp32 [T] (token order).
  m.def("moe_act_backward(Tensor p, Tensor h, Tensor sorted_token_ids, Tensor expert_offsets, Tensor? gate, "
        "Tensor? grad_out, Tensor? b2, int activation, bool gated, Tensor(a!) dh, Tensor(b!) ga, "
        "Tensor(c!) dgate) -> ()");
  m.def("moe_segment_colsum(Tensor x, Tensor expert_offsets, Tensor? scale, Tensor? sorted_token_ids, "
        "Tensor(a!) partial) -> ()");
}

namespace {
void register_impls(torch::Library& m) {
  m.impl("grouped_gemm", &moebert::grouped_gemm);
  m.impl("grouped_gemm_plan", &moebert::grouped_gemm_plan);
  m.impl("moe_bias_act", &moebert::moe_bias_act);
  m.impl("moe_scatter_rows", &moebert::moe_scatter_rows);
  m.impl("moe_act_backward", &moebert::moe_act_backward);
  m.impl("moe_segment_colsum", &moebert::moe_segment_colsum);
}
}  // namespace

TORCH_LIBRARY_IMPL(moebert_C, CUDA, m) { register_impls(m); }

// CPU tensors reach the same entry points, whose first check names the problem; the plan
// runs on the host (the CPU twin of the device-side argument builder).
TORCH_LIBRARY_IMPL(moebert_C, CPU, m) { register_impls(m); }
