"""The services layer: agent, model and env step logic as classes with their dependencies passed in."""
