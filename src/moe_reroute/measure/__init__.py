"""Measurement: quality evaluation, MoE-layer latency, cost model and reports."""
