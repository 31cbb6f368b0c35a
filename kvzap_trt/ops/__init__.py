"""Cache ops. Use `kvzap_trt.ops.dispatch.ops(device)`: references here, CUDA kernels in cuda_kernels."""
