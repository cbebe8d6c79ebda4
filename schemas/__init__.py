"""Pydantic models: relay options, delivery requests and results, replies."""
