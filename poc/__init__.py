"""Arrow Flight served through a reverse WebSocket tunnel, and the workbook that measures it."""

__version__ = "0.1.0"
