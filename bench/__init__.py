"""flowsolve's own benchmarks: step-count sweeps (accuracy vs NFE) and, later, speed."""
