"""moebsr."""
