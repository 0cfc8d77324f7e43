"""Reports, inspection and plots."""
