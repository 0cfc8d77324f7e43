"""Reading checkpoints and data, finding layer stacks, and writing files (the format's spec: fileformat)."""
