"""Decode and resize one sample: images, video, header probes, and the grid rule."""
