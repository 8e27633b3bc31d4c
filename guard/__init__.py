"""The runtime guard: serves exported heads with numpy, Pillow and onnxruntime. Never imports torch."""
