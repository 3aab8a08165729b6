"""Experiment entry points: thin absl scripts over the library."""
