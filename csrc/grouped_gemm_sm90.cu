// sm_90a grouped GEMMs: CUTLASS 3.x pointer-array GEMM, TMA loads, warp-specialized cooperative
// kernel on HGMMA, 128x128x64 tiles, 2x1 clusters (the two CTAs of a cluster share the
// expert's weight tile through TMA multicast), fp32 accumulation, LinearCombination epilogue
// (D = A B, no source). Instantiated for bf16 and fp16 in the three layouts of grouped_gemm.h.
//
// The per-group problem shapes, pointers and strides live in device memory and are written by
// _sm90_args_kernel from expert_offsets; CUTLASS gets no host problem shapes, so its persistent
// grid is sized by the SM count and nothing waits on the device. Compiled for another arch
// (the sm_80 pass of TORCH_CUDA_ARCH_LIST="8.0;9.0a") this file keeps only the host stubs.
#include "grouped_gemm.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#if defined(MOEBERT_HAS_SM90A)
#include <cute/tensor.hpp>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#endif

namespace moebert {

#if defined(MOEBERT_HAS_SM90A)
namespace {

using namespace cute;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;

template <typename Element, typename LayoutA, typename LayoutB>
struct Sm90Gemm {
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte accesses
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlign, Element, LayoutD*,
      kAlign, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// The argument arrays, carved out of one device buffer (each piece 16-byte aligned).
template <typename G>
struct Sm90Args {
  typename ProblemShape::UnderlyingProblemShape* shapes;
  const typename G::Gemm::ElementA** a;
  const typename G::Gemm::ElementB** b;
  typename G::Gemm::EpilogueOutputOp::ElementOutput** d;
  typename G::StrideA* sa;
  typename G::StrideB* sb;
  typename G::StrideD* sd;
};

constexpr int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

template <typename G>
int64_t args_bytes(int64_t E) {
  return align16(E * sizeof(typename ProblemShape::UnderlyingProblemShape)) + 3 * align16(E * sizeof(void*)) +
         align16(E * sizeof(typename G::StrideA)) + align16(E * sizeof(typename G::StrideB)) +
         align16(E * sizeof(typename G::StrideD));
}

template <typename G>
Sm90Args<G> carve(void* base, int64_t E) {
  char* p = static_cast<char*>(base);
  Sm90Args<G> r;
  auto take = [&](int64_t bytes) { char* q = p; p += align16(bytes); return q; };
  r.shapes = reinterpret_cast<decltype(r.shapes)>(take(E * sizeof(*r.shapes)));
  r.a = reinterpret_cast<decltype(r.a)>(take(E * sizeof(void*)));
  r.b = reinterpret_cast<decltype(r.b)>(take(E * sizeof(void*)));
  r.d = reinterpret_cast<decltype(r.d)>(take(E * sizeof(void*)));
  r.sa = reinterpret_cast<decltype(r.sa)>(take(E * sizeof(*r.sa)));
  r.sb = reinterpret_cast<decltype(r.sb)>(take(E * sizeof(*r.sb)));
  r.sd = reinterpret_cast<decltype(r.sd)>(take(E * sizeof(*r.sd)));
  return r;
}

// One thread per expert: its (m, n, k), pointers and (packed) strides.
template <typename G>
__global__ void _sm90_args_kernel(Sm90Args<G> args, int kind, const int64_t* __restrict__ offsets, int64_t E,
                                  int64_t M, int64_t N, int64_t K, const typename G::Gemm::ElementA* a,
                                  const typename G::Gemm::ElementB* b,
                                  typename G::Gemm::EpilogueOutputOp::ElementOutput* d) {
  const int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (e >= E) return;
  const GroupProblem p = group_problem(kind, e, offsets[e], offsets[e + 1], M, N, K);
  const int m = (int)p.m, n = (int)p.n, k = (int)p.k;
  args.shapes[e] = make_shape(m, n, k);
  args.a[e] = a + p.a_off;
  args.b[e] = b + p.b_off;
  args.d[e] = d + p.d_off;
  // Packed strides; the leading dimension is the fixed one (K, N or M), never the row count.
  args.sa[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, make_shape(kind == kWeightGrad ? (int)M : 1,
                                                                                   kind == kWeightGrad ? 1 : (int)K, 1));
  args.sb[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, make_shape((int)N, kind == kRowsByWeightT
                                                                                   ? (int)K : 1, 1));
  args.sd[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, make_shape(1, (int)N, 1));
}

int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (cached[device] == 0) cached[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return cached[device];
}

template <typename G>
typename G::Gemm::Arguments make_arguments(const GroupedGemmCall& c, const Sm90Args<G>& args) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = c.device;
  hw.sm_count = sm_count(c.device);
  typename G::Gemm::Arguments arguments{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {(int)c.E, args.shapes, nullptr},
      {args.a, args.sa, args.b, args.sb},
      {{}, nullptr, args.sd, args.d, args.sd},
      hw};
  auto& fusion = arguments.epilogue.thread;
  fusion.alpha = 1.f;
  fusion.beta = 0.f;
  return arguments;
}

template <typename G>
int64_t workspace_bytes(const GroupedGemmCall& c) {
  return (int64_t)G::Gemm::get_workspace_size(make_arguments<G>(c, carve<G>(nullptr, c.E)));
}

template <typename G>
void run(const GroupedGemmCall& c) {
  using EA = typename G::Gemm::ElementA;
  using EB = typename G::Gemm::ElementB;
  using ED = typename G::Gemm::EpilogueOutputOp::ElementOutput;
  auto stream = static_cast<cudaStream_t>(c.stream);
  const Sm90Args<G> args = carve<G>(c.args, c.E);
  _sm90_args_kernel<G><<<(unsigned)((c.E + 127) / 128), 128, 0, stream>>>(
      args, c.kind, c.offsets, c.E, c.M, c.N, c.K, static_cast<const EA*>(c.a), static_cast<const EB*>(c.b),
      static_cast<ED*>(c.d));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("sm90 grouped GEMM arguments: ") + cudaGetErrorString(err));
  typename G::Gemm gemm;
  const auto arguments = make_arguments<G>(c, args);
  cutlass::Status st = gemm.can_implement(arguments);
  if (st != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("sm90 grouped GEMM cannot run these shapes: ") +
                             cutlass::cutlassGetStatusString(st));
  st = gemm.initialize(arguments, c.workspace, stream);
  if (st == cutlass::Status::kSuccess) st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("sm90 grouped GEMM failed: ") + cutlass::cutlassGetStatusString(st));
}

using Row = cutlass::layout::RowMajor;
using Col = cutlass::layout::ColumnMajor;
// A row-major [rows, K]; the weight [N, K] is B column-major (K-major), [K, N] B row-major.
// Weight grad: A = rows^T, i.e. A column-major [M, rows]; B row-major [rows, N].
template <typename Element>
using RowsByWeightT = Sm90Gemm<Element, Row, Col>;
template <typename Element>
using RowsByWeight = Sm90Gemm<Element, Row, Row>;
template <typename Element>
using WeightGrad = Sm90Gemm<Element, Col, Row>;

template <template <typename> class Fn>
auto by_kind_and_dtype(const GroupedGemmCall& c) {
  if (c.dtype == 2) {
    using E = cutlass::bfloat16_t;
    if (c.kind == kRowsByWeightT) return Fn<RowsByWeightT<E>>::call(c);
    if (c.kind == kRowsByWeight) return Fn<RowsByWeight<E>>::call(c);
    return Fn<WeightGrad<E>>::call(c);
  }
  if (c.dtype == 1) {
    using E = cutlass::half_t;
    if (c.kind == kRowsByWeightT) return Fn<RowsByWeightT<E>>::call(c);
    if (c.kind == kRowsByWeight) return Fn<RowsByWeight<E>>::call(c);
    return Fn<WeightGrad<E>>::call(c);
  }
  throw std::invalid_argument("the sm90 grouped GEMM takes float16 or bfloat16 only");
}

template <typename G>
struct Run { static int64_t call(const GroupedGemmCall& c) { run<G>(c); return 0; } };
template <typename G>
struct Workspace { static int64_t call(const GroupedGemmCall& c) { return workspace_bytes<G>(c); } };

}  // namespace

bool sm90_grouped_gemm_built() { return true; }

int64_t sm90_grouped_gemm_args_bytes(int64_t E) {
  // The largest over the instantiations (they differ only in stride types).
  int64_t n = args_bytes<RowsByWeightT<cutlass::half_t>>(E);
  n = std::max(n, args_bytes<RowsByWeight<cutlass::half_t>>(E));
  return std::max(n, args_bytes<WeightGrad<cutlass::half_t>>(E));
}

int64_t sm90_grouped_gemm_workspace_bytes(const GroupedGemmCall& c) { return by_kind_and_dtype<Workspace>(c); }

void sm90_grouped_gemm(const GroupedGemmCall& c) { by_kind_and_dtype<Run>(c); }

#else  // built without sm_90a: the callers check sm90_grouped_gemm_built() first

bool sm90_grouped_gemm_built() { return false; }
int64_t sm90_grouped_gemm_args_bytes(int64_t) { return 0; }
int64_t sm90_grouped_gemm_workspace_bytes(const GroupedGemmCall&) { return 0; }
void sm90_grouped_gemm(const GroupedGemmCall&) {
  throw std::runtime_error("moebert_kernels._C was built without sm_90a (TORCH_CUDA_ARCH_LIST lacks 9.0a)");
}

#endif

}  // namespace moebert
