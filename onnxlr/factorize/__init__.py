"""The factorization: targets (find and group weights), plan (rank policies and budgets), lowrank (SVD backends),
rewrite (factor tensors and nodes), quantize (onnxruntime's quantizer after it), revert, cost and results;
pipeline runs them in order.
"""
