"""UnisonDB: a log-native key-value database server."""

__version__ = "0.1.0"
