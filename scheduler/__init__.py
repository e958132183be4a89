"""The user's command line: a thin shell over realfake."""
