"""Compile kernel specs into one runtime module, export it, cache it on disk."""
