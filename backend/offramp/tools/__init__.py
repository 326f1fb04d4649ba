"""Offline tools: calibration of exits, exit simulation, evaluation, benchmarks and their plots."""
