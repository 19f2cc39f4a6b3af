"""The package version, in a module of its own: reading it must not import the package's heavy parts."""
__version__ = "0.1.0"
