"""ONNX zero-shot heads baked from what `cbpt` wrote."""
