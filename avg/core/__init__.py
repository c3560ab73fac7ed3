"""The core every layer uses: atomic I/O, stage manifests, run tracking, entry points, seeding, devices, progress."""
