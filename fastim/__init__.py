"""fastim: a real-time message server with a compiled fan-out core."""

__version__ = "0.1.0"
