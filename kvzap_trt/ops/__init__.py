"""Cache ops. Use `kvzap_trt.ops.dispatch.ops(device)`; the modules here are the references."""
