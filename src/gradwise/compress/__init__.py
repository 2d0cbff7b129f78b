"""Compressing trained runs: pruning, quantization and knowledge distillation, each variant measured.

Submodules are imported explicitly (``from gradwise.compress.prune import magnitude_prune``):
torchao, ONNX Runtime and Torch-Pruning are heavy and are only loaded by the step that needs them.
"""
