"""Benchmarks: ratios against PyTorch measured in the same process, printed and saved as JSON."""
