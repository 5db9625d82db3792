"""What every stage shares: atomic file writes, image decoding and encoding, device and precision
choice, the table printer, the decode-ahead helper and one-line error messages. Imports nothing else of :mod:`pipeline`."""
