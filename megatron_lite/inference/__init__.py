"""Inference: loading any checkpoint for generation (any tp x pp, or a HF directory), and the server."""
