"""Device profiles and the profiler (see the device-profiles issue)."""
