"""Builders of the bundled assets and the vendored test corpus (``python -m tools.<name>``)."""
