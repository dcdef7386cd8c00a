"""Helper module of compat_helper_types.py: workers cannot import it (it is not on their path)."""
