"""Export stages to ONNX graphs, with mixed precision and parity validation."""
