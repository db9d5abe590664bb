"""Time and estimates: latency (candidate pairs timed, latency tables), confirm (the whole model end to end),
bench (onnxruntime latency, per-layer profiles) and edge (roofline estimates for edge devices).
"""
