"""Benchmarks: each compares raycord side by side with the design it replaces and with
what a user would pick instead, in one run, and reports ratios. Results go to
bench/results/."""
