"""The local web app: the page, its job queue and its files."""
