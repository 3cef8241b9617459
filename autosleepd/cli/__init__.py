"""The command line: serve, status/sleep/wake against a running instance, sim and demo."""
