"""spotune control plane: plan, launch, watch and audit fine-tuning jobs. Never imports torch or sky."""

__version__ = "0.1.0"
