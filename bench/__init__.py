"""Benchmarks: each module writes JSON to bench/results/ and a section of BENCHMARKS.md."""
