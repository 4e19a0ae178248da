"""The extract loop: pipeline, token-budget batching, device compute, ranks and progress."""
