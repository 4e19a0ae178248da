"""The models: vision towers behind one interface, the SpatialMergeProjector, checkpoint reading."""
