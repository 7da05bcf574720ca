"""dsq.calib_data."""
