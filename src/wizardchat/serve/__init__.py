"""A resident model: `wizardchat serve` keeps a loaded engine behind a Unix socket (server.py),
and `ask`, `run` and batch mode use it through RemoteEngine (client.py) instead of loading."""
