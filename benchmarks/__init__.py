"""The benchmarks, each a script (`python benchmarks/NAME.py --help`); tests import them as `benchmarks.NAME`."""
