pytest_plugins = ["offbeat.testing"]
