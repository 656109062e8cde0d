// The routing plan on the device: histogram, scan and a stable index scatter.
//
// Tokens are cut into chunks of kChunk. Three kernels, no host sync (CUDA-graph safe):
//   1. _routing_histogram_kernel: per-chunk expert counts  cc[c, e]
//   2. _routing_scan_kernel (one CTA): cc[c, e] <- offsets[e] + sum_{c' < c} cc[c', e],
//      counts[e] and offsets[E+1]
//   3. _routing_scatter_kernel: each token's position is its chunk's base for its expert
//      plus the number of earlier tokens of the chunk with the same expert, which keeps
//      token order inside an expert (the same plan as a stable sort).
// Ids outside [0, E) are skipped; the Python caller checks them with a device assert.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace moebert {
namespace {

constexpr int kChunk = 256;  // tokens per chunk; also the CTA size of kernels 1 and 3

__global__ void _routing_histogram_kernel(const int64_t* __restrict__ ids, int64_t ids_stride,  // [T]
                                          int64_t T, int E, int* __restrict__ cc) {             // [C, E]
  const int64_t t = (int64_t)blockIdx.x * kChunk + threadIdx.x;
  if (t >= T) return;
  const int64_t e = ids[t * ids_stride];
  if (e >= 0 && e < E) atomicAdd(&cc[(int64_t)blockIdx.x * E + e], 1);
}

__global__ void _routing_scan_kernel(int* __restrict__ cc, int64_t C, int E,
                                     int64_t* __restrict__ counts,    // [E]
                                     int64_t* __restrict__ offsets) { // [E+1]
  // Per expert (threads in parallel), an exclusive scan over chunks.
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int v = cc[c * E + e];
      cc[c * E + e] = run;
      run += v;
    }
    counts[e] = run;
  }
  __syncthreads();
  // E is small: one thread scans the expert totals.
  if (threadIdx.x == 0) {
    int64_t acc = 0;
    offsets[0] = 0;
    for (int e = 0; e < E; ++e) {
      acc += counts[e];
      offsets[e + 1] = acc;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int base = (int)offsets[e];
    for (int64_t c = 0; c < C; ++c) cc[c * E + e] += base;
  }
}

__global__ void _routing_scatter_kernel(const int64_t* __restrict__ ids, int64_t ids_stride, int64_t T, int E,
                                        const int* __restrict__ cc,          // [C, E] chunk bases
                                        int64_t* __restrict__ sorted_ids,    // [T]
                                        int64_t* __restrict__ inverse) {     // [T]
  __shared__ int64_t chunk_ids[kChunk];
  const int64_t t = (int64_t)blockIdx.x * kChunk + threadIdx.x;
  const int64_t e = t < T ? ids[t * ids_stride] : -1;
  chunk_ids[threadIdx.x] = e;
  __syncthreads();
  if (t >= T || e < 0 || e >= E) return;
  int rank = 0;
  for (int j = 0; j < (int)threadIdx.x; ++j) rank += chunk_ids[j] == e;
  const int64_t pos = cc[(int64_t)blockIdx.x * E + e] + rank;
  sorted_ids[pos] = t;
  inverse[t] = pos;
}

void check_index_out(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& ids) {
  TORCH_CHECK(t.is_cuda() && t.device() == ids.device(), "moebert_C::routing_plan: ", name, " must be on ",
              ids.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == n && t.is_contiguous(),
              "moebert_C::routing_plan: ", name, " must be a contiguous int64 tensor of shape [", n, "], got ",
              t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " (non-contiguous)");
}

void routing_plan(const at::Tensor& expert_ids, int64_t num_experts, const at::Tensor& sorted_token_ids,
                  const at::Tensor& expert_counts, const at::Tensor& expert_offsets, const at::Tensor& inverse) {
  TORCH_CHECK(expert_ids.is_cuda(), "moebert_C::routing_plan needs CUDA tensors; expert_ids is on ",
              expert_ids.device(), " (use RoutingPlan.from_expert_ids for CPU tensors)");
  TORCH_CHECK(expert_ids.dim() == 1, "moebert_C::routing_plan: expert_ids must be 1-D [T], got ",
              expert_ids.sizes());
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong, "moebert_C::routing_plan: expert_ids must be int64, got ",
              expert_ids.scalar_type());
  TORCH_CHECK(num_experts >= 1 && num_experts <= (1 << 20), "moebert_C::routing_plan: num_experts must be in [1, ",
              1 << 20, "], got ", num_experts);
  const int64_t T = expert_ids.size(0);
  TORCH_CHECK(T < (int64_t(1) << 31), "moebert_C::routing_plan: too many tokens (", T, ")");
  const int E = (int)num_experts;
  check_index_out(sorted_token_ids, "sorted_token_ids", T, expert_ids);
  check_index_out(expert_counts, "expert_counts", E, expert_ids);
  check_index_out(expert_offsets, "expert_offsets", E + 1, expert_ids);
  check_index_out(inverse, "inverse", T, expert_ids);
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  auto stream = at::cuda::getCurrentCUDAStream();

  const int64_t C = (T + kChunk - 1) / kChunk;
  // zeros() fills on the current stream; the caching allocator keeps this graph safe.
  at::Tensor cc = at::zeros({C > 0 ? C : 1, E}, expert_ids.options().dtype(at::kInt));
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  const int64_t stride = expert_ids.stride(0);
  if (C > 0) {
    _routing_histogram_kernel<<<(unsigned)C, kChunk, 0, stream>>>(ids, stride, T, E, cc.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  _routing_scan_kernel<<<1, 1024, 0, stream>>>(cc.data_ptr<int>(), C, E, expert_counts.data_ptr<int64_t>(),
                                               expert_offsets.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (C > 0) {
    _routing_scatter_kernel<<<(unsigned)C, kChunk, 0, stream>>>(ids, stride, T, E, cc.data_ptr<int>(),
                                                                sorted_token_ids.data_ptr<int64_t>(),
                                                                inverse.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace moebert

TORCH_LIBRARY_FRAGMENT(moebert_C, m) {
  // Fills a RoutingPlan's index tensors from expert_ids [T] int64 (outputs int64, allocated by the caller).
  m.def(
      "routing_plan(Tensor expert_ids, int num_experts, Tensor(a!) sorted_token_ids, Tensor(b!) expert_counts, "
      "Tensor(c!) expert_offsets, Tensor(d!) inverse) -> ()");
}

TORCH_LIBRARY_IMPL(moebert_C, CUDA, m) { m.impl("routing_plan", &moebert::routing_plan); }

// CPU tensors get the op's own error message rather than the dispatcher's.
TORCH_LIBRARY_IMPL(moebert_C, CPU, m) { m.impl("routing_plan", &moebert::routing_plan); }
