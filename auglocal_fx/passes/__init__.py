"""The planning passes, in order: trace (1), profile (2a), cuts (2b), layers (2c), axes (2d)
with the layout vocabulary, partition (3), selection (4a). ``planner.py`` runs them.
"""
