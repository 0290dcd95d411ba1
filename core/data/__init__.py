"""Data: the paper's image transforms and caption normalisation, datasets in their public file
formats, the synthetic ``shapes`` world, and the frozen-feature cache."""
