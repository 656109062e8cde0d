// sm_80+ grouped GEMMs: CUTLASS 2.x GemmGrouped (persistent CTAs walk the groups' tiles on the
// device, GroupScheduleMode::kDeviceOnly, so no host problem sizes are needed), fp32
// accumulation, D = A B (alpha only: the source is never read). 16-bit types on tensor cores
// (mma.sync 16x8x16, cp.async 4-stage pipeline, 128x128x32 tiles, 16-byte accesses); fp32 on
// SIMT FMA (alignment 1, so any size). Used on sm_80..sm_89, for fp32 everywhere, and for
// 16-bit types when the build has no sm_90a code. Three layouts, see grouped_gemm.h.
#include "grouped_gemm.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"

namespace moebert {
namespace {

template <typename Element, typename LayoutA, typename LayoutB>
struct Sm80Gemm {
  static constexpr bool kSimt = std::is_same<Element, float>::value;
  static constexpr int kAlign = kSimt ? 1 : 128 / cutlass::sizeof_bits<Element>::value;
  using Epilogue = cutlass::epilogue::thread::LinearCombination<Element, kAlign, float, float,
                                                                cutlass::epilogue::thread::ScaleType::OnlyAlphaScaling>;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, LayoutA, cutlass::ComplexTransform::kNone, kAlign, Element, LayoutB, cutlass::ComplexTransform::kNone,
      kAlign, Element, cutlass::layout::RowMajor, float,
      typename std::conditional<kSimt, cutlass::arch::OpClassSimt, cutlass::arch::OpClassTensorOp>::type,
      cutlass::arch::Sm80,
      typename std::conditional<kSimt, cutlass::gemm::GemmShape<128, 128, 8>, cutlass::gemm::GemmShape<128, 128, 32>>::type,
      typename std::conditional<kSimt, cutlass::gemm::GemmShape<32, 64, 8>, cutlass::gemm::GemmShape<64, 64, 32>>::type,
      typename std::conditional<kSimt, cutlass::gemm::GemmShape<1, 1, 1>, cutlass::gemm::GemmShape<16, 8, 16>>::type,
      Epilogue, cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, kSimt ? 3 : 4,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
};

struct Sm80Args {
  cutlass::gemm::GemmCoord* shapes;
  void** a;
  void** b;
  void** d;
  int64_t* lda;
  int64_t* ldb;
  int64_t* ldd;
};

constexpr int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

Sm80Args carve(void* base, int64_t E) {
  char* p = static_cast<char*>(base);
  auto take = [&](int64_t bytes) { char* q = p; p += align16(bytes); return q; };
  Sm80Args r;
  r.shapes = reinterpret_cast<cutlass::gemm::GemmCoord*>(take(E * sizeof(cutlass::gemm::GemmCoord)));
  r.a = reinterpret_cast<void**>(take(E * sizeof(void*)));
  r.b = reinterpret_cast<void**>(take(E * sizeof(void*)));
  r.d = reinterpret_cast<void**>(take(E * sizeof(void*)));
  r.lda = reinterpret_cast<int64_t*>(take(E * sizeof(int64_t)));
  r.ldb = reinterpret_cast<int64_t*>(take(E * sizeof(int64_t)));
  r.ldd = reinterpret_cast<int64_t*>(take(E * sizeof(int64_t)));
  return r;
}

// One thread per expert. Leading dimensions are the fixed sizes: A [rows, K] (K), weight [N, K]
// (K) or [K, N] (N), D (N); weight grad: A^T of [rows, M] (M), B [rows, N] (N), D [M, N] (N).
__global__ void _sm80_args_kernel(Sm80Args args, int kind, const int64_t* __restrict__ offsets, int64_t E, int64_t M,
                                  int64_t N, int64_t K, const char* a, const char* b, char* d, int elem_bytes) {
  const int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (e >= E) return;
  const GroupProblem p = group_problem(kind, e, offsets[e], offsets[e + 1], M, N, K);
  args.shapes[e] = cutlass::gemm::GemmCoord((int)p.m, (int)p.n, (int)p.k);
  args.a[e] = const_cast<char*>(a) + p.a_off * elem_bytes;
  args.b[e] = const_cast<char*>(b) + p.b_off * elem_bytes;
  args.d[e] = d + p.d_off * elem_bytes;
  args.lda[e] = kind == kWeightGrad ? M : K;
  args.ldb[e] = kind == kRowsByWeightT ? K : N;
  args.ldd[e] = N;
}

template <typename G>
int threadblock_count(int device) {
  static int per_sm = -1;  // per instantiation; the same on every device of one arch
  if (per_sm < 0) per_sm = std::max(1, G::Gemm::maximum_active_blocks());
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return per_sm * std::max(1, sms);
}

template <typename G>
void run(const GroupedGemmCall& c) {
  using Element = typename G::Gemm::ElementA;
  auto stream = static_cast<cudaStream_t>(c.stream);
  const Sm80Args args = carve(c.args, c.E);
  _sm80_args_kernel<<<(unsigned)((c.E + 127) / 128), 128, 0, stream>>>(
      args, c.kind, c.offsets, c.E, c.M, c.N, c.K, static_cast<const char*>(c.a), static_cast<const char*>(c.b),
      static_cast<char*>(c.d), (int)sizeof(Element));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("sm80 grouped GEMM arguments: ") + cudaGetErrorString(err));
  auto** ptr_a = reinterpret_cast<Element**>(args.a);
  auto** ptr_b = reinterpret_cast<Element**>(args.b);
  auto** ptr_d = reinterpret_cast<Element**>(args.d);
  typename G::Gemm::Arguments arguments(args.shapes, (int)c.E, threadblock_count<G>(c.device),
                                        typename G::Epilogue::Params(1.f, 0.f), ptr_a, ptr_b, ptr_d, ptr_d, args.lda,
                                        args.ldb, args.ldd, args.ldd);
  typename G::Gemm gemm;
  cutlass::Status st = gemm.initialize(arguments, nullptr, stream);
  if (st == cutlass::Status::kSuccess) st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("sm80 grouped GEMM failed: ") + cutlass::cutlassGetStatusString(st));
}

using Row = cutlass::layout::RowMajor;
using Col = cutlass::layout::ColumnMajor;

template <typename Element>
void run_kind(const GroupedGemmCall& c) {
  if (c.kind == kRowsByWeightT) return run<Sm80Gemm<Element, Row, Col>>(c);
  if (c.kind == kRowsByWeight) return run<Sm80Gemm<Element, Row, Row>>(c);
  return run<Sm80Gemm<Element, Col, Row>>(c);
}

}  // namespace

int64_t sm80_grouped_gemm_args_bytes(int64_t E) {
  return align16(E * sizeof(cutlass::gemm::GemmCoord)) + 6 * align16(E * 8);
}

void sm80_grouped_gemm(const GroupedGemmCall& c) {
  if (c.dtype == 0) return run_kind<float>(c);
  if (c.dtype == 1) return run_kind<cutlass::half_t>(c);
  if (c.dtype == 2) return run_kind<cutlass::bfloat16_t>(c);
  throw std::invalid_argument("the sm80 grouped GEMM takes float32, float16 or bfloat16");
}

}  // namespace moebert
