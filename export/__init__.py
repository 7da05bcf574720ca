"""dsq.export."""
