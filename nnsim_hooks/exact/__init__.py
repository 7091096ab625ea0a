"""Exact kernels: Gram blocks, dataset-scale sums (density, consistency), the matrix denoising factor."""
