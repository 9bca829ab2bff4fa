"""What runs in training: the net, the block-wise step, bundles, recompute, aux precision, the
checkpoint format and memory measurement.
"""
