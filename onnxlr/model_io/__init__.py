"""Models and inputs in and out: io (safe loading), save (atomic, streamed external data), shapes, inputs (users'
.npz files), synthesis (inputs a model accepts).
"""
