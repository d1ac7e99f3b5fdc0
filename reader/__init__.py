"""A vision tower that reads: training, shipped weights and measurement for the embedded models' eyes."""
