"""Downstream evaluation: lm-evaluation-harness style requests, task readers, metrics, code sandbox."""
