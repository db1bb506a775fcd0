"""The host agent that sits beside an engine: control stream, session table, engine adapters."""
