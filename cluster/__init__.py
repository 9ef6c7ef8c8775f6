"""Ray cluster mode (see the cluster issue); builds on edgemoe's public API only."""
