"""Benchmarks run by `bench.py`: one module per subcommand."""
