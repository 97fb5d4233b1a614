"""Readers and writers for the file formats researchers bring and take away."""
