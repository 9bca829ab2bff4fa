"""Harnesses for checking the library on many models (the zoo check's stages); not the API.
"""
