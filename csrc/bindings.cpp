// The Python module moebert_kernels._C. Importing it loads this library, whose static
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks (one per .cu file) register the ops
// under torch.ops.moebert_C, where torch.compile and torch.library can see them. Nothing is
// bound through pybind11 directly.
#include <torch/extension.h>

// setup.py passes the TORCH_CUDA_ARCH_LIST of the build, ";" replaced by ","; variadic because of the commas.
#ifndef MOEBERT_CUDA_ARCHS
#define MOEBERT_CUDA_ARCHS
#endif
#define MOEBERT_STR_(...) #__VA_ARGS__
#define MOEBERT_STR(...) MOEBERT_STR_(__VA_ARGS__)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moebert-kernels CUDA ops; call them through torch.ops.moebert_C.*";
  m.attr("cuda_archs") = MOEBERT_STR(MOEBERT_CUDA_ARCHS);
}
