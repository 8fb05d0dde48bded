"""Layer 0, no rmlib imports: where things live (paths), atomic file I/O, precision choice, run bookkeeping."""
