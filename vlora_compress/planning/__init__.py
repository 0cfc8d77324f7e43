"""Planning by measurement: which form, rank and storage each family takes."""
