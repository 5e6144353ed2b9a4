"""SafeSpace: show, measure and fix the safety loss that fine-tuning causes in aligned LMs."""

__version__ = "0.1.0"
