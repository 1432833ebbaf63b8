"""fedgate gateway: HTTP surface and process wiring (app factory, settings, handlers, services, store)."""

__version__ = "0.1.0"
