"""Training.

The step, the loop, optimizer and schedule, FLOPs/MFU, signals and TensorBoard logging.
"""
