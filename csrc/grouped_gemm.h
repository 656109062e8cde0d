// The grouped GEMMs of the expert FFN, one per expert ("group"), on CUTLASS.
//
// Three shapes cover the six GEMMs of the layer (rows are in expert order; expert e owns
// rows [offsets[e], offsets[e+1])):
//   kRowsByWeightT : D[s, :] = A[s, :] W[e]^T    A [T, K], W [E, N, K], D [T, N]   (up, down)
//   kRowsByWeight  : D[s, :] = A[s, :] W[e]      A [T, K], W [E, K, N], D [T, N]   (dH, dX)
//   kWeightGrad    : D[e] = A[rows e]^T B[rows e]  A [T, M], B [T, N], D [E, M, N]  (dW1, dW2)
// Every operand is contiguous, so one group's problem is its (m, n, k) and three element
// offsets into A, B and D. group_problem() computes them; it runs on the device (the kernel
// that fills CUTLASS's argument arrays from expert_offsets, so no host sync) and on the host
// (the CPU op grouped_gemm_plan, which the tests compare with a Python reference).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define MOEBERT_HD __host__ __device__ __forceinline__
#else
#define MOEBERT_HD inline
#endif

namespace moebert {

enum GroupedGemmKind : int { kRowsByWeightT = 0, kRowsByWeight = 1, kWeightGrad = 2 };

struct GroupProblem {
  int64_t m, n, k;
  int64_t a_off, b_off, d_off;  // element offsets of the group's A, B and D
};

// dims: (M, N, K) of the call; the row count of a group replaces M (row kinds) or K (weight grad).
// An empty expert gets m = 0: no tiles, no work. In the weight grad that leaves D[e] unwritten
// (a GEMM with k = 0 would have to write zeros; the caller zeroes those experts instead).
MOEBERT_HD GroupProblem group_problem(int kind, int64_t e, int64_t lo, int64_t hi, int64_t M, int64_t N,
                                      int64_t K) {
  const int64_t rows = hi - lo;
  GroupProblem p;
  if (kind == kWeightGrad) {
    p.m = rows > 0 ? M : 0;
    p.n = N;
    p.k = rows;
    p.a_off = lo * M;
    p.b_off = lo * N;
    p.d_off = e * M * N;
  } else {
    p.m = rows;
    p.n = N;
    p.k = K;
    p.a_off = lo * K;
    p.b_off = e * N * K;
    p.d_off = lo * N;
  }
  return p;
}

// One grouped GEMM call: fp32 accumulation, D = A B (alpha 1, no source), D in the input dtype.
struct GroupedGemmCall {
  int kind;
  int dtype;  // 0 float32, 1 float16, 2 bfloat16
  int64_t E, M, N, K;
  const void* a;
  const void* b;
  void* d;
  const int64_t* offsets;  // device, [E + 1]
  void* args;              // device scratch of grouped_gemm_args_bytes(E) bytes
  void* workspace;         // device scratch for CUTLASS, see *_workspace_bytes
  int64_t workspace_bytes;
  int device;
  void* stream;            // cudaStream_t
};

// CUTLASS 3.x pointer-array GEMM with TMA and warp specialization (sm_90a; 16-bit types).
bool sm90_grouped_gemm_built();
int64_t sm90_grouped_gemm_args_bytes(int64_t E);
int64_t sm90_grouped_gemm_workspace_bytes(const GroupedGemmCall& call);
void sm90_grouped_gemm(const GroupedGemmCall& call);

// CUTLASS 2.x grouped GEMM (sm_80 and later; 16-bit on tensor cores, fp32 on SIMT).
int64_t sm80_grouped_gemm_args_bytes(int64_t E);
void sm80_grouped_gemm(const GroupedGemmCall& call);

}  // namespace moebert
