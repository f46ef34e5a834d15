"""The home of both console scripts (rkvsim.cli.main); it sits above every other package."""
