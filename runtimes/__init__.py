"""dsq.runtimes."""
