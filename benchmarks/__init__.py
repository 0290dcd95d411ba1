"""blip2kit's benchmark suite: blip2kit and the reference implementation on the same work, in one
run, reported as times and ratios (``python -m benchmarks --help``)."""
