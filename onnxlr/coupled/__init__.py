"""Coupled pairs compressed jointly: each kind (pairs: MLP and gated MLP, conv_pairs: conv channel pairs, heads:
attention V·O, scores: attention Q·Kᵀ; joint: the select-and-refit numerics) answers the Protocols that plans
(the dispatcher: find, measure, choose, settle, rewrite) declares.
"""
