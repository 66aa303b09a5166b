"""Generating long videos: the streaming sampler, the refiner, and durable output (video, resumable state)."""
