"""Running and checking models with onnxruntime: runtime (providers, sessions), verify (metrics and gates),
segments and layer_check (models larger than memory), memory and memory_plan (what fits).
"""
