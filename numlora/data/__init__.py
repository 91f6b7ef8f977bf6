"""Data files shipped with numlora (read with :mod:`importlib.resources`); see README.md and
LICENSE in this folder for what they are and where they come from."""
