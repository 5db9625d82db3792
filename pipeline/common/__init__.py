"""What every stage shares: atomic file writes, image decoding and encoding, device and precision
choice, the table printer and the decode-ahead helper. Imports nothing else of :mod:`pipeline`."""
