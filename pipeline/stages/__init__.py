"""One module per stage, each with a `run(cfg, ...)` entry. Stages never import each other:
they talk only through the files documented in README.md."""
