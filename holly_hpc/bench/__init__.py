"""Benchmarks behind `holly-hpc bench …`: each module has `run(...) -> list[dict]` and `main(argv) -> int`."""
