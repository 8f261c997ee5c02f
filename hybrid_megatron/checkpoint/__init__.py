"""Checkpoints: the directory layout and atomic commit (``layout``), the architecture check on load
(``architecture``), CPU reads and writes of torch_dist files without a model (``offline``), and the
live training state's save and resume through megatron (``live``)."""
