"""Assembling the net from a plan: the graph cut into pieces (split, emit: pass 5), every block's
aux net (synthesize: pass 4b, with adapters, aux inits and light heads), and the checks run on
what was built (shapecheck, axis_audit).
"""
