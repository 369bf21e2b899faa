"""Small shared pieces with no dependency beyond the standard library: atomic files, locks,
durations, process liveness and "did you mean" hints."""
