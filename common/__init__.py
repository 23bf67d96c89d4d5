"""Small pieces every package shares (atomic file writes); nothing here imports the project."""
