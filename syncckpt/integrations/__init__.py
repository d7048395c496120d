"""Integrations with training frameworks (``syncckpt.integrations.transformers``: the Trainer callback)."""
