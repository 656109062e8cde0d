// The Python module moebert_kernels._C. Importing it loads this library, whose static
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks (one per .cu file) register the ops
// under torch.ops.moebert_C, where torch.compile and torch.library can see them. Nothing is
// bound through pybind11 directly.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moebert-kernels CUDA ops; call them through torch.ops.moebert_C.*";
}
