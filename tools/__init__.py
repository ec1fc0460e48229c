"""Desk tools: the edgekey CLI, benchmarks, plots and reports."""
