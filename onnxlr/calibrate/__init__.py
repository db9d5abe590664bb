"""Calibration: activation statistics from onnxruntime runs of the original model (calibration, masks) and the
data-aware steps between planning and the rewrite (datafit: whitening, sensitivity, target search, compensation).
"""
