"""Supervised fine-tuning on the schema's rendered targets: the warm start, SFT runs, the control."""
