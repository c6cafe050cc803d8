"""Process groups, layout checks and the CPU platform module.

`cpu_platform` is the only module in the project that knows CPUs lack CUDA.
"""
