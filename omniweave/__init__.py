"""OmniWeave: model-centric distributed training for omni-modal LLMs."""

__version__ = "0.1.0"
