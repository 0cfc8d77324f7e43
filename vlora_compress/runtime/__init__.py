"""Running a VLoRA file: expanded to dense, or factored as it is stored."""
