"""Use cases: handlers parse and render, services decide, the store persists."""
