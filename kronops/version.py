"""The kronops version (also the package metadata's, through pyproject.toml)."""
__version__ = "0.1.0"
