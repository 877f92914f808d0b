"""Tools over a cluster or a model: benchmarks, load test, soak test, profiler."""
