"""Block backends: run one block of decoder layers (PyTorch, or exported graphs on ONNX Runtime / TensorRT)."""
