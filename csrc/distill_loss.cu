// MoEBERT's layer-wise distillation loss: the loss terms and the student gradients in one forward pass.
//
// Two ops (the math and the conventions live in moebert_kernels/ops/distill_loss.py):
//   distill_hidden_forward: one multi-tensor launch over all L hidden-state pairs. The layer addresses
//     travel by value in the kernel parameters (LayerTable), so nothing is stacked or copied to the device.
//     Grid (blocks of the largest layer, layers); each CTA reads a tile of student and teacher once,
//     writes the gradient coef_l * m * (s - t) and one fp32 partial sum of m * (s - t)^2; the partials
//     are then summed per layer in a fixed order (deterministic).
//   distill_logits_forward: one CTA per logits row (the SQuAD start and end heads share the launch).
//     Pass 1 keeps online softmax statistics per thread, merged across the CTA; pass 2 writes the
//     gradient of alpha_ce * CE + lam * L_pred.
// All reductions are fp32; gradients are stored in the student dtype.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace moebert {
namespace {

constexpr int kMaxLayers = 32;      // layers per launch (kernel parameters stay under 4 KiB); more are grouped
constexpr int kHiddenThreads = 256;
constexpr int kHiddenTile = 4096;   // elements per CTA: 16 per thread, enough bytes in flight per SM
constexpr int kIgnoreIndex = -100;

template <typename T>
struct LayerTable {
  const T* s[kMaxLayers];
  const T* t[kMaxLayers];
  T* g[kMaxLayers];
  int64_t numel[kMaxLayers];
  int64_t H[kMaxLayers];
  float coef[kMaxLayers];  // 2 * lam * w_l / (numel, or H when masked: times inv_count in the kernel)
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sum over the CTA; the result is valid in thread 0.
template <int kThreads>
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float part[kThreads / 32];
  x = warp_sum(x);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = x;
  __syncthreads();
  x = threadIdx.x < kThreads / 32 ? part[threadIdx.x] : 0.f;
  if (threadIdx.x < 32) x = warp_sum(x);
  return x;
}

// V elements per load when every layer is 16-byte aligned and H is a multiple of V (HF hidden states are).
template <typename T, int V, bool kMask, bool kGrad>
__global__ void __launch_bounds__(kHiddenThreads)
    _distill_hidden_fwd_kernel(const LayerTable<T> tab,
                               const float* __restrict__ mask,       // [B*S] 1 real, 0 padding (kMask)
                               const float* __restrict__ inv_count,  // [1] 1 / max(#real tokens, 1) (kMask)
                               float* __restrict__ partial,          // [layers of this launch, n_blocks]
                               int64_t n_blocks) {
  const int l = blockIdx.y;
  const int64_t numel = tab.numel[l];
  const T* __restrict__ s = tab.s[l];
  const T* __restrict__ t = tab.t[l];
  T* __restrict__ g = tab.g[l];
  const int64_t H = tab.H[l];
  float coef = tab.coef[l];
  if (kMask) coef *= *inv_count;
  float acc = 0.f;
  const int64_t tile = (int64_t)blockIdx.x * kHiddenTile;
#pragma unroll
  for (int i = 0; i < kHiddenTile / (kHiddenThreads * V); ++i) {
    const int64_t idx = tile + ((int64_t)i * kHiddenThreads + threadIdx.x) * V;
    if (idx >= numel) break;  // V divides numel on the vector path; the scalar path has V == 1
    Pack<T, V> sv = *reinterpret_cast<const Pack<T, V>*>(s + idx);
    Pack<T, V> tv = *reinterpret_cast<const Pack<T, V>*>(t + idx);
    Pack<T, V> gv;
    const float m = kMask ? mask[idx / H] : 1.f;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float d = static_cast<float>(sv.v[j]) - static_cast<float>(tv.v[j]);
      if (kMask) d *= m;
      acc += d * d;
      gv.v[j] = static_cast<T>(coef * d);
    }
    if (kGrad) *reinterpret_cast<Pack<T, V>*>(g + idx) = gv;
  }
  acc = block_sum<kHiddenThreads>(acc);
  if (threadIdx.x == 0) partial[(int64_t)l * n_blocks + blockIdx.x] = acc;
}

// ---- logits ----------------------------------------------------------------------------------

template <typename T>
struct HeadTable {
  const T* s[2];
  const T* t[2];
  T* g[2];
};

// Online log-sum-exp state: m = max, d = sum exp(z - m), a = sum exp(z - m) * x for a side value x.
struct Online {
  float m, d, a;
};

__device__ __forceinline__ Online online_merge(Online p, Online q) {
  const float m = fmaxf(p.m, q.m);
  if (m == -INFINITY) return p;  // both empty
  const float sp = p.m == -INFINITY ? 0.f : expf(p.m - m);
  const float sq = q.m == -INFINITY ? 0.f : expf(q.m - m);
  return {m, p.d * sp + q.d * sq, p.a * sp + q.a * sq};
}

__device__ __forceinline__ Online online_add(Online p, float z, float x) {
  // exp(-inf) = 0 adds nothing; without this, a -inf logit seen while p is still empty
  // (p.m = -inf) takes the branch below with expf(-inf - -inf) = NaN and poisons the whole row.
  if (z == -INFINITY) return p;
  if (z <= p.m) {
    const float e = expf(z - p.m);
    return {p.m, p.d + e, p.a + e * x};
  }
  const float r = p.m == -INFINITY ? 0.f : expf(p.m - z);
  return {z, p.d * r + 1.f, p.a * r + x};
}

__device__ __forceinline__ Online warp_merge(Online o) {
#pragma unroll
  for (int k = 16; k > 0; k >>= 1) {
    Online q{__shfl_xor_sync(0xffffffffu, o.m, k), __shfl_xor_sync(0xffffffffu, o.d, k),
             __shfl_xor_sync(0xffffffffu, o.a, k)};
    o = online_merge(o, q);
  }
  return o;
}

// Merge over the CTA; every thread gets the result.
template <int kThreads>
__device__ Online block_merge(Online o, Online* smem /* [kThreads / 32] */) {
  o = warp_merge(o);
  __syncthreads();  // smem may still be read by a previous call
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = o;
  __syncthreads();
  Online r = smem[0];
  for (int w = 1; w < kThreads / 32; ++w) r = online_merge(r, smem[w]);
  return r;
}

template <int kThreads>
__device__ float block_sum_all(float x, float* smem /* [kThreads / 32] */) {
  x = warp_sum(x);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = x;
  __syncthreads();
  float r = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) r += smem[w];
  return r;
}

constexpr int kPredSymKL = 0, kPredKL = 1, kPredMSE = 2;

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    _distill_logits_fwd_kernel(const HeadTable<T> tab,
                               const int64_t* __restrict__ labels,   // [heads, B] class ids, or nullptr
                               const float* __restrict__ targets,    // [1, B] regression targets, or nullptr
                               const float* __restrict__ ce_norm,    // [heads]
                               const float* __restrict__ pred_norm,  // [heads]
                               float* __restrict__ row_ce,           // [heads * B] out
                               float* __restrict__ row_pred,         // [heads * B] out
                               int64_t B, int64_t C, float alpha_ce, float lam, float temperature, int pred_kind,
                               bool compute_grad) {
  __shared__ Online smem_o[kThreads / 32];
  __shared__ float smem_f[kThreads / 32];
  const int64_t row = blockIdx.x;
  const int head = (int)(row / B);
  const int64_t b = row % B;
  const T* __restrict__ s = tab.s[head] + b * C;
  const T* __restrict__ t = tab.t[head] + b * C;
  T* __restrict__ g = compute_grad ? tab.g[head] + b * C : nullptr;
  const float pn = pred_norm[head] * lam;

  if (C == 1) {  // regression: squared errors; one thread does the row
    if (threadIdx.x != 0) return;
    const float sv = static_cast<float>(s[0]);
    const float pd = sv - static_cast<float>(t[0]);
    row_pred[row] = pd * pd;
    float gr = pn * 2.f * pd;
    if (targets != nullptr) {
      const float cd = sv - targets[row];
      row_ce[row] = cd * cd;
      gr += ce_norm[head] * alpha_ce * 2.f * cd;
    } else {
      row_ce[row] = 0.f;
    }
    if (compute_grad) g[0] = static_cast<T>(gr);
    return;
  }

  const float inv_t = 1.f / temperature;
  const bool has_labels = labels != nullptr;
  // Pass 1: p_s, p_t at temperature T (side value zs - zt), the CE softmax at T = 1, the squared gap.
  Online os{-INFINITY, 0.f, 0.f}, ot{-INFINITY, 0.f, 0.f}, oc{-INFINITY, 0.f, 0.f};
  float sq = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const float sv = static_cast<float>(s[c]);
    const float tv = static_cast<float>(t[c]);
    if (pred_kind == kPredMSE) {
      sq += (sv - tv) * (sv - tv);
    } else {
      const float dz = (sv - tv) * inv_t;
      os = online_add(os, sv * inv_t, dz);
      ot = online_add(ot, tv * inv_t, dz);
    }
    if (has_labels) oc = online_add(oc, sv, 0.f);
  }
  float lse_s = 0.f, lse_t = 0.f, ps_dz = 0.f;
  float pred;
  if (pred_kind == kPredMSE) {
    pred = block_sum_all<kThreads>(sq, smem_f);
  } else {
    os = block_merge<kThreads>(os, smem_o);
    ot = block_merge<kThreads>(ot, smem_o);
    lse_s = os.m + logf(os.d);
    lse_t = ot.m + logf(ot.d);
    ps_dz = os.a / os.d;  // E_{p_s}[zs - zt]
    const float pt_dz = ot.a / ot.d;
    const float t2 = temperature * temperature;
    // sym_kl: 0.5 * sum (p_s - p_t)(log p_s - log p_t); the lse terms cancel since sum(p_s - p_t) = 0.
    pred = pred_kind == kPredKL ? t2 * (lse_s - lse_t - pt_dz) : 0.5f * t2 * (ps_dz - pt_dz);
  }
  float cn = 0.f, lse_c = 0.f;
  int64_t y = -1;
  if (has_labels) {
    oc = block_merge<kThreads>(oc, smem_o);
    lse_c = oc.m + logf(oc.d);
    y = labels[row];
    const bool keep = y != kIgnoreIndex;
    const bool in_range = y >= 0 && y < C;  // checked in Python; out of range shows as NaN, never as a stray read
    cn = keep ? ce_norm[head] * alpha_ce : 0.f;
    if (threadIdx.x == 0) row_ce[row] = !keep ? 0.f : in_range ? lse_c - static_cast<float>(s[y]) : NAN;
    if (!keep) y = -1;
  } else if (threadIdx.x == 0) {
    row_ce[row] = 0.f;
  }
  if (threadIdx.x == 0) row_pred[row] = pred;
  if (!compute_grad) return;

  // Pass 2: the gradient, one column per thread per step.
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const float sv = static_cast<float>(s[c]);
    const float tv = static_cast<float>(t[c]);
    float gr;
    if (pred_kind == kPredMSE) {
      gr = pn * 2.f * (sv - tv);
    } else {
      const float zs = sv * inv_t, zt = tv * inv_t;
      const float ps = expf(zs - lse_s), pt = expf(zt - lse_t);
      gr = pred_kind == kPredSymKL ? pn * 0.5f * temperature * (ps * ((zs - zt) - ps_dz) + ps - pt)
                                   : pn * temperature * (ps - pt);
    }
    if (has_labels) gr += cn * (expf(sv - lse_c) - (c == y ? 1.f : 0.f));
    g[c] = static_cast<T>(gr);
  }
}

// ---- host side -------------------------------------------------------------------------------

void check_cuda_contiguous(const at::Tensor& x, const char* op, const char* what, int64_t i,
                           const at::Device& dev) {
  TORCH_CHECK(x.is_cuda(), "moebert_C::", op, " needs CUDA tensors; ", what, "[", i, "] is on ", x.device());
  TORCH_CHECK(x.device() == dev, "moebert_C::", op, ": ", what, "[", i, "] is on ", x.device(), " but ", what,
              "[0] is on ", dev);
  TORCH_CHECK(x.is_contiguous(), "moebert_C::", op, ": ", what, "[", i, "] must be contiguous (got strides ",
              x.strides(), "); call .contiguous() first");
}

template <typename T>
void launch_hidden(at::TensorList student, at::TensorList teacher, at::TensorList grads, const float* mask,
                   const float* inv_count, c10::ArrayRef<double> coef, at::Tensor& partial, int64_t n_blocks,
                   cudaStream_t stream) {
  const int64_t L = (int64_t)student.size();
  const bool grad = !grads.empty();
  bool vec = true;
  constexpr int V = 16 / sizeof(T);
  for (int64_t l = 0; l < L; ++l) {
    auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    // H % V too, so that a pack never straddles two tokens (one mask lookup per pack).
    vec = vec && student[l].size(-1) % V == 0 && aligned(student[l].data_ptr()) && aligned(teacher[l].data_ptr()) &&
          (!grad || aligned(grads[l].data_ptr()));
  }
  for (int64_t l0 = 0; l0 < L; l0 += kMaxLayers) {
    const int n = (int)std::min<int64_t>(kMaxLayers, L - l0);
    LayerTable<T> tab{};
    for (int i = 0; i < n; ++i) {
      const int64_t l = l0 + i;
      tab.s[i] = student[l].data_ptr<T>();
      tab.t[i] = teacher[l].data_ptr<T>();
      tab.g[i] = grad ? grads[l].data_ptr<T>() : nullptr;
      tab.numel[i] = student[l].numel();
      tab.H[i] = student[l].size(-1);
      tab.coef[i] = (float)coef[l];
    }
    const dim3 grid((unsigned)n_blocks, (unsigned)n);
    float* out = partial.data_ptr<float>() + l0 * n_blocks;
#define MOEBERT_HIDDEN_LAUNCH(VV, MASK, GRAD) \
  _distill_hidden_fwd_kernel<T, VV, MASK, GRAD><<<grid, kHiddenThreads, 0, stream>>>(tab, mask, inv_count, out, n_blocks)
#define MOEBERT_HIDDEN_LAUNCH_V(VV)                                   \
  if (mask != nullptr) {                                              \
    if (grad) MOEBERT_HIDDEN_LAUNCH(VV, true, true);                  \
    else MOEBERT_HIDDEN_LAUNCH(VV, true, false);                      \
  } else {                                                            \
    if (grad) MOEBERT_HIDDEN_LAUNCH(VV, false, true);                 \
    else MOEBERT_HIDDEN_LAUNCH(VV, false, false);                     \
  }
    if (vec) {
      MOEBERT_HIDDEN_LAUNCH_V(V)
    } else {
      MOEBERT_HIDDEN_LAUNCH_V(1)
    }
#undef MOEBERT_HIDDEN_LAUNCH_V
#undef MOEBERT_HIDDEN_LAUNCH
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void distill_hidden_forward(at::TensorList student, at::TensorList teacher, const std::optional<at::Tensor>& mask,
                            const std::optional<at::Tensor>& inv_count, c10::ArrayRef<double> coef,
                            at::TensorList grads, const at::Tensor& sq_sums) {
  static const char* op = "distill_hidden_forward";
  const int64_t L = (int64_t)student.size();
  TORCH_CHECK(L >= 1, "moebert_C::distill_hidden_forward needs at least one hidden-state pair");
  TORCH_CHECK((int64_t)teacher.size() == L && (int64_t)coef.size() == L,
              "moebert_C::distill_hidden_forward: ", L, " student tensors but ", teacher.size(), " teacher tensors and ",
              coef.size(), " coefficients");
  TORCH_CHECK(grads.empty() || (int64_t)grads.size() == L, "moebert_C::distill_hidden_forward: grads must be empty or ",
              "hold ", L, " tensors, got ", grads.size());
  const at::Device dev = student[0].device();
  const auto dtype = student[0].scalar_type();
  int64_t max_numel = 0;
  for (int64_t l = 0; l < L; ++l) {
    check_cuda_contiguous(student[l], op, "student", l, dev);
    check_cuda_contiguous(teacher[l], op, "teacher", l, dev);
    TORCH_CHECK(student[l].sizes() == teacher[l].sizes(), "moebert_C::distill_hidden_forward: pair ", l,
                ": student ", student[l].sizes(), " vs teacher ", teacher[l].sizes());
    TORCH_CHECK(student[l].scalar_type() == dtype && teacher[l].scalar_type() == dtype,
                "moebert_C::distill_hidden_forward: all hidden states must share one dtype (", dtype, ")");
    TORCH_CHECK(student[l].dim() >= 1, "moebert_C::distill_hidden_forward: hidden state ", l, " is a scalar");
    if (!grads.empty()) {
      check_cuda_contiguous(grads[l], op, "grads", l, dev);
      TORCH_CHECK(grads[l].sizes() == student[l].sizes() && grads[l].scalar_type() == dtype,
                  "moebert_C::distill_hidden_forward: grads[", l, "] must match student[", l, "]");
    }
    max_numel = std::max(max_numel, student[l].numel());
  }
  TORCH_CHECK(mask.has_value() == inv_count.has_value(),
              "moebert_C::distill_hidden_forward: pass mask and inv_count together");
  const float* mask_p = nullptr;
  const float* inv_p = nullptr;
  if (mask.has_value()) {
    check_cuda_contiguous(*mask, op, "mask", 0, dev);
    check_cuda_contiguous(*inv_count, op, "inv_count", 0, dev);
    TORCH_CHECK(mask->scalar_type() == at::kFloat && inv_count->scalar_type() == at::kFloat,
                "moebert_C::distill_hidden_forward: mask and inv_count must be float32");
    for (int64_t l = 0; l < L; ++l)
      TORCH_CHECK(mask->numel() * student[l].size(-1) == student[l].numel(),
                  "moebert_C::distill_hidden_forward: mask has ", mask->numel(), " tokens but hidden state ", l,
                  " is ", student[l].sizes());
    mask_p = mask->data_ptr<float>();
    inv_p = inv_count->data_ptr<float>();
  }
  TORCH_CHECK(sq_sums.is_cuda() && sq_sums.device() == dev && sq_sums.scalar_type() == at::kFloat &&
                  sq_sums.numel() == L && sq_sums.is_contiguous(),
              "moebert_C::distill_hidden_forward: sq_sums must be a contiguous float32 [", L, "] tensor on ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t n_blocks = std::max<int64_t>((max_numel + kHiddenTile - 1) / kHiddenTile, 1);
  TORCH_CHECK(n_blocks < (int64_t(1) << 31), "moebert_C::distill_hidden_forward: hidden state too large");
  at::Tensor partial = at::empty({L, n_blocks}, student[0].options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "distill_hidden_forward", [&] {
    launch_hidden<scalar_t>(student, teacher, grads, mask_p, inv_p, coef, partial, n_blocks, stream);
  });
  at::sum_out(const_cast<at::Tensor&>(sq_sums), partial, {1});
}

template <typename T>
void launch_logits(at::TensorList student, at::TensorList teacher, at::TensorList grads, const int64_t* labels,
                   const float* targets, const float* ce_norm, const float* pred_norm, float* row_ce,
                   float* row_pred, int64_t B, int64_t C, double alpha_ce, double lam, double temperature,
                   int64_t pred_kind, cudaStream_t stream) {
  const int heads = (int)student.size();
  const bool grad = !grads.empty();
  HeadTable<T> tab{};
  for (int h = 0; h < heads; ++h) {
    tab.s[h] = student[h].data_ptr<T>();
    tab.t[h] = teacher[h].data_ptr<T>();
    tab.g[h] = grad ? grads[h].data_ptr<T>() : nullptr;
  }
  const unsigned rows = (unsigned)(heads * B);
#define MOEBERT_LOGITS_LAUNCH(NT)                                                                            \
  _distill_logits_fwd_kernel<T, NT><<<rows, NT, 0, stream>>>(tab, labels, targets, ce_norm, pred_norm, row_ce, \
                                                             row_pred, B, C, (float)alpha_ce, (float)lam,        \
                                                             (float)temperature, (int)pred_kind, grad)
  // Wide rows (a vocabulary) get more threads; a handful of classes needs one warp's worth.
  if (C >= 4096) {
    MOEBERT_LOGITS_LAUNCH(1024);
  } else if (C >= 512) {
    MOEBERT_LOGITS_LAUNCH(256);
  } else {
    MOEBERT_LOGITS_LAUNCH(64);
  }
#undef MOEBERT_LOGITS_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void distill_logits_forward(at::TensorList student, at::TensorList teacher, const std::optional<at::Tensor>& labels,
                            const at::Tensor& ce_norm, const at::Tensor& pred_norm, double alpha_ce, double lam,
                            double temperature, int64_t pred_kind, at::TensorList grads, const at::Tensor& row_ce,
                            const at::Tensor& row_pred) {
  static const char* op = "distill_logits_forward";
  const int64_t heads = (int64_t)student.size();
  TORCH_CHECK(heads == 1 || heads == 2, "moebert_C::distill_logits_forward: 1 logits tensor or a (start, end) pair, ",
              "got ", heads);
  TORCH_CHECK((int64_t)teacher.size() == heads, "moebert_C::distill_logits_forward: ", heads,
              " student heads but ", teacher.size(), " teacher heads");
  TORCH_CHECK(grads.empty() || (int64_t)grads.size() == heads,
              "moebert_C::distill_logits_forward: grads must be empty or hold ", heads, " tensors");
  TORCH_CHECK(pred_kind >= 0 && pred_kind <= 2, "moebert_C::distill_logits_forward: pred_kind must be 0, 1 or 2");
  TORCH_CHECK(temperature > 0, "moebert_C::distill_logits_forward: temperature must be > 0");
  const at::Device dev = student[0].device();
  const auto dtype = student[0].scalar_type();
  TORCH_CHECK(student[0].dim() == 2, "moebert_C::distill_logits_forward: logits must be [B, C], got ",
              student[0].sizes());
  const int64_t B = student[0].size(0), C = student[0].size(1);
  for (int64_t h = 0; h < heads; ++h) {
    check_cuda_contiguous(student[h], op, "student", h, dev);
    check_cuda_contiguous(teacher[h], op, "teacher", h, dev);
    TORCH_CHECK(student[h].sizes() == student[0].sizes() && teacher[h].sizes() == student[0].sizes(),
                "moebert_C::distill_logits_forward: every head must be [", B, ", ", C, "]");
    TORCH_CHECK(student[h].scalar_type() == dtype && teacher[h].scalar_type() == dtype,
                "moebert_C::distill_logits_forward: logits must share one dtype (", dtype, ")");
    if (!grads.empty()) {
      check_cuda_contiguous(grads[h], op, "grads", h, dev);
      TORCH_CHECK(grads[h].sizes() == student[h].sizes() && grads[h].scalar_type() == dtype,
                  "moebert_C::distill_logits_forward: grads[", h, "] must match student[", h, "]");
    }
  }
  for (const at::Tensor* x : {&ce_norm, &pred_norm}) {
    check_cuda_contiguous(*x, op, "norm", 0, dev);
    TORCH_CHECK(x->scalar_type() == at::kFloat && x->numel() == heads,
                "moebert_C::distill_logits_forward: ce_norm and pred_norm must be float32 [", heads, "]");
  }
  for (const at::Tensor* x : {&row_ce, &row_pred}) {
    check_cuda_contiguous(*x, op, "row", 0, dev);
    TORCH_CHECK(x->scalar_type() == at::kFloat && x->numel() == heads * B,
                "moebert_C::distill_logits_forward: row_ce and row_pred must be float32 [", heads, ", ", B, "]");
  }
  const int64_t* labels_p = nullptr;
  const float* targets_p = nullptr;
  if (labels.has_value()) {
    check_cuda_contiguous(*labels, op, "labels", 0, dev);
    TORCH_CHECK(labels->numel() == heads * B, "moebert_C::distill_logits_forward: labels must be [", heads, ", ", B,
                "], got ", labels->sizes());
    if (C == 1) {
      TORCH_CHECK(labels->scalar_type() == at::kFloat, "moebert_C::distill_logits_forward: regression targets ",
                  "(C == 1) must be float32, got ", labels->scalar_type());
      targets_p = labels->data_ptr<float>();
    } else {
      TORCH_CHECK(labels->scalar_type() == at::kLong, "moebert_C::distill_logits_forward: labels must be int64, got ",
                  labels->scalar_type());
      labels_p = labels->data_ptr<int64_t>();
    }
  }
  if (B == 0) return;
  TORCH_CHECK(heads * B < (int64_t(1) << 31), "moebert_C::distill_logits_forward: too many rows");
  const c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "distill_logits_forward", [&] {
    launch_logits<scalar_t>(student, teacher, grads, labels_p, targets_p, ce_norm.data_ptr<float>(),
                            pred_norm.data_ptr<float>(), row_ce.data_ptr<float>(), row_pred.data_ptr<float>(), B, C,
                            alpha_ce, lam, temperature, pred_kind, stream);
  });
}

}  // namespace
}  // namespace moebert

TORCH_LIBRARY_FRAGMENT(moebert_C, m) {
  // Hidden-state MSE over L pairs in one launch. coef[l] = 2 * lam * w_l / numel_l (unmasked) or / H_l (masked,
  // then also times inv_count = 1 / max(#real tokens, 1)). Writes grads[l] = coef_l * m * (s - t) (skipped when
  // grads is empty) and sq_sums[l] = sum m * (s - t)^2 (fp32).
  m.def(
      "distill_hidden_forward(Tensor[] student, Tensor[] teacher, Tensor? mask, Tensor? inv_count, float[] coef, "
      "Tensor(a!)[] grads, Tensor(b!) sq_sums) -> ()");
  // Logits rows of 1 head [B, C] or the SQuAD pair. pred_kind: 0 sym_kl, 1 kl, 2 mse (C == 1 is regression).
  // labels: [heads, B] int64 (-100 ignored), or float32 targets when C == 1. Writes per-row CE and prediction
  // loss (fp32) and grads = alpha_ce * ce_norm * dCE + lam * pred_norm * dPred.
  m.def(
      "distill_logits_forward(Tensor[] student, Tensor[] teacher, Tensor? labels, Tensor ce_norm, Tensor pred_norm, "
      "float alpha_ce, float lam, float temperature, int pred_kind, Tensor(a!)[] grads, Tensor(b!) row_ce, "
      "Tensor(c!) row_pred) -> ()");
}

TORCH_LIBRARY_IMPL(moebert_C, CUDA, m) {
  m.impl("distill_hidden_forward", &moebert::distill_hidden_forward);
  m.impl("distill_logits_forward", &moebert::distill_logits_forward);
}

// CPU tensors reach the same entry points, whose first check names the problem.
TORCH_LIBRARY_IMPL(moebert_C, CPU, m) {
  m.impl("distill_hidden_forward", &moebert::distill_hidden_forward);
  m.impl("distill_logits_forward", &moebert::distill_logits_forward);
}
