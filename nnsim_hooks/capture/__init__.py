"""Capture: hooks on the model for one pass, and what they record."""
