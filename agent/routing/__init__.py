"""Routing: terminal queueing model and load-balance degree (paper, section 2.2.2)."""
