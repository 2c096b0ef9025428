"""Developer scripts (benchmarks, golden regeneration, fixtures); importable as ``scripts.X``."""
