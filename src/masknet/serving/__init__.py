"""From a trained run to production: model bundle, batch prediction, ONNX export, HTTP service."""
