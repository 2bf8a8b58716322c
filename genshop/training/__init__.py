"""Training jobs: each is a function taking a config and one progress callback."""
