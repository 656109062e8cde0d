"""CUDA C++ backend: thin Python launchers over the ``torch.ops.moebert_C`` ops built from csrc/.

Importing this package never touches the compiled extension; each launcher loads it on
first use through :func:`moebert_kernels._cuda.load` and raises its reason when it cannot.
"""
