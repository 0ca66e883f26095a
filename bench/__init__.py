"""Benchmarks: inference latency, training throughput and FLOP utilisation, data path, evaluation speed, memory,
and `bench gpu`, every GPU figure in one run (docs/benchmarks.md). Installed as `stepdistill.bench`; drives the
training loop, so it sits above `stepdistill.train` beside the evaluation harness."""
