"""Model inputs: slicing batches, and batches from any dataset in a stable, resumable order."""
