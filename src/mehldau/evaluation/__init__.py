"""Note-level metrics comparing generated jazz piano with a human reference."""
