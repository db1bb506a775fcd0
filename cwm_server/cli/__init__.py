"""The `cwm` command line. Nothing imports it; it imports everything it drives."""
