"""Profiling: the real pipeline's latency by stage (latency), the decode bound that memory bandwidth
sets (roofline), and `hovle-edge profile` as one call (command). Torch-free, like the runtime it times."""
