"""Compute backends: one module per place jobs run, each speaking contract.backend.Backend."""
