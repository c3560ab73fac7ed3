"""Small helpers shared by every stage: atomic I/O, logging, seeding."""
