"""SafeSpace's benchmarks: `python bench/run.py` runs them (bench/README.md says what each measures)."""
