"""The engine: one captured pass, and per-sample gradients, Grams and sketches from it."""
