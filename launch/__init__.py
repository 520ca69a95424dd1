"""Compute backends: one protocol (launch.base.Backend), one module per place jobs run."""
