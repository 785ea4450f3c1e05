"""File formats agents and the controller both read and write (no wire messages: see contract/)."""
